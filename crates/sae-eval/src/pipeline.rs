//! The `sae eval`, `sae sweep` and `sae demo` pipelines (the CLI only parses flags).

use crate::eval::{self, EvalData, EvalReport};
use crate::report;
use crate::sweep::{self, RunSpec, SweepRow};
use anyhow::{bail, Context, Result};
use sae_core::{saelens, ArchKind};
use sae_lm::{LanguageModel, ProductPrecision};
use sae_output::{Progress, ProgressGroup};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `sae eval`.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub sae: PathBuf,
    pub model: String,
    pub corpus: String,
    /// Non-BOS evaluation tokens.
    pub tokens: usize,
    pub ctx: usize,
    pub batch: usize,
    /// Hook to splice at; default the one in the SAE's cfg.json.
    pub hook: Option<String>,
    /// Stream tokens to skip; default: the size of the activation store the SAE was trained on.
    pub skip_tokens: Option<usize>,
    /// Output directory; default `<sae>/eval`.
    pub out: Option<PathBuf>,
    /// How the model's weight products run.
    pub products: ProductPrecision,
}

/// Checks an SAE directory has both files before loading anything big.
fn check_sae_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("SAE directory {} does not exist", dir.display());
    }
    for f in [saelens::CFG_FILE, saelens::WEIGHTS_FILE] {
        if !dir.join(f).is_file() {
            bail!(
                "SAE directory {} has no {f}; an SAE directory holds {} and {} (SAELens layout)",
                dir.display(),
                saelens::CFG_FILE,
                saelens::WEIGHTS_FILE
            );
        }
    }
    Ok(())
}

/// Stream tokens the SAE's training text covered: the `n_tokens` of the activation store
/// named in its cfg.json (`dataset_path`), when that store was harvested from `corpus`.
pub fn training_tokens(sae: &sae_core::Sae, corpus: &str) -> Option<usize> {
    let m = sae_store::writer::Manifest::read(Path::new(&sae.meta.dataset_path)).ok()?;
    if m.corpus != corpus {
        return Some(0);
    }
    // Rows count BOS when it was kept; stream tokens are at most the rows.
    Some(m.n_tokens)
}

fn bar(group: Option<&ProgressGroup>, len: u64, prefix: &str) -> Progress {
    let template = format!("{prefix:>24} [{{bar:25}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})");
    match group {
        Some(g) => g.add(len, prefix, &template),
        None => Progress::new(len, prefix, &template),
    }
}

/// `sae eval`: checks first (SAE files, hook, width), then the baseline and the SAE passes.
pub fn run_eval(o: &EvalOptions) -> Result<EvalReport> {
    check_sae_dir(&o.sae)?;
    let out = o.out.clone().unwrap_or_else(|| o.sae.join("eval"));
    let check_out = || {
        let sae = sae_output::Input {
            flag: "--sae",
            path: &o.sae,
            allowed_child: Some("eval"),
        };
        sae_output::check_output(&out, sae_output::OutputKind::Eval, &[sae], false)
    };
    check_out()?;
    let _lock = sae_output::OutputLock::acquire(&out)?;
    let sae = saelens::load(&o.sae)?;
    let hook = match (&o.hook, sae.meta.hook_name.as_str()) {
        (Some(h), _) => h.clone(),
        (None, "") => bail!("{}: cfg.json names no hook; pass --hook", o.sae.display()),
        (None, h) => h.to_string(),
    };
    let skip = match o.skip_tokens {
        Some(s) => s,
        None => training_tokens(&sae, &o.corpus).with_context(|| {
            format!(
                "cannot tell which text SAE {} was trained on (no activation store at '{}'); pass \
                 --skip-tokens N to skip the first N corpus tokens (0 if it was trained on other text)",
                o.sae.display(),
                sae.meta.dataset_path
            )
        })?,
    };
    let t0 = Instant::now();
    let model = LanguageModel::load_with_products(&o.model, o.products)?;
    eval::check_sae_fits(&sae, &o.sae.display().to_string(), &model, &hook)?;
    let data = EvalData::load(&model, &o.corpus, &hook, o.tokens, o.ctx, o.batch, skip)?;
    eprintln!(
        "eval: {} contexts of {} tokens from '{}' after skipping {skip} tokens; model loaded and text packed in {:.1}s",
        data.n_contexts(),
        o.ctx,
        o.corpus,
        t0.elapsed().as_secs_f64()
    );
    let b = bar(None, 4 * data.n_batches() as u64, "forward passes");
    let name = o.sae.display().to_string();
    let max_norm = eval::trained_max_norm(&o.sae);
    let r = evaluate_on(&model, &sae, &name, max_norm, &data, &mut |d, _| {
        b.set_position(d as u64);
        Ok(())
    })?;
    b.finish_and_clear();
    check_out()?;
    report::write_eval(&out, &r)?;
    eprintln!(
        "eval: {:.1}s in all; wrote {}",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(r)
}

/// The passes of `sae eval` on packed held-out text: the baseline (clean, zero- and
/// mean-ablated) then the spliced pass, `4 x data.n_batches()` forward passes in all.
/// `progress(done, total)` before the first pass and after each; an error from it stops the
/// evaluation and is returned. Writes nothing.
pub fn evaluate_on(
    model: &LanguageModel,
    sae: &sae_core::Sae,
    sae_name: &str,
    max_norm: Option<f32>,
    data: &EvalData,
    progress: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<EvalReport> {
    let total = 4 * data.n_batches();
    progress(0, total)?;
    let base = eval::baseline(model, data, &mut |d, _| progress(d, total))?;
    let n0 = 3 * data.n_batches();
    eval::evaluate_sae(model, sae, sae_name, data, &base, max_norm, &mut |d, _| {
        progress(n0 + d, total)
    })
}

/// Options of `sae sweep`.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub acts: PathBuf,
    pub archs: Vec<ArchKind>,
    pub l1: Vec<f32>,
    /// Per-architecture coefficients (override `l1` for that architecture).
    pub l1_by_arch: Vec<(ArchKind, Vec<f32>)>,
    pub k: Vec<usize>,
    pub d_sae: Option<usize>,
    pub steps: Option<u64>,
    pub tokens: Option<u64>,
    pub batch_size: usize,
    /// Peak learning rate (default: the architecture's, see `sae train --help`).
    pub lr: Option<f32>,
    pub model: String,
    /// Default: the store's hook.
    pub hook: Option<String>,
    pub corpus: Option<String>,
    pub eval_tokens: usize,
    pub ctx: usize,
    pub eval_batch: usize,
    pub seed: u64,
    pub out: PathBuf,
    /// Train finished runs that saw fewer steps than asked on to that many.
    pub extend: bool,
    /// Keep each run's final checkpoint (optimiser state) for a later exact extension.
    pub keep_state: bool,
    /// A line of setup text for the report (the demo says what it chose).
    pub note: String,
    /// How the model's weight products run in the evaluations.
    pub products: ProductPrecision,
}

/// Final summary of a sweep.
pub struct SweepResult {
    pub rows: Vec<SweepRow>,
    pub failed: Vec<(String, String)>,
    pub comparison: Option<sweep::Comparison>,
}

/// Latest step of a running training, from its log in `<out>.partial`.
fn training_step(run_dir: &Path) -> Option<u64> {
    let log = sae_train::partial_dir(run_dir)
        .ok()?
        .join(sae_train::run::LOG_FILE);
    let text = std::fs::read_to_string(log).ok()?;
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str::<serde_json::Value>(last).ok()?["step"].as_u64()
}

/// A sweep writes into an empty or new directory, or one of its own (finished runs in it are
/// kept and reused); never the user's files or the activation store it trains on.
fn check_sweep_out(o: &SweepOptions) -> Result<()> {
    // The demo harvests its store into the sweep directory itself.
    let own_store = o.acts == o.out.join("acts");
    let inputs: Vec<sae_output::Input> = (!own_store)
        .then(|| sae_output::Input::new("--acts", &o.acts))
        .into_iter()
        .collect();
    sae_output::check_output(&o.out, sae_output::OutputKind::Sweep, &inputs, false)?;
    Ok(())
}

/// `sae sweep`: the grid is checked (and the store, the model and the hook) before training.
pub fn run_sweep(o: &SweepOptions) -> Result<SweepResult> {
    let runs = sweep::grid_per_arch(&o.archs, &o.l1, &o.l1_by_arch, &o.k)?;
    run_grid(o, &runs)
}

/// A sweep over given runs.
pub fn run_grid(o: &SweepOptions, runs: &[RunSpec]) -> Result<SweepResult> {
    if runs.is_empty() {
        bail!("the sweep grid is empty");
    }
    check_sweep_out(o)?;
    let _lock = sae_output::OutputLock::acquire(&o.out)?;
    check_sweep_out(o)?;
    let manifest = sae_store::writer::Manifest::read(&o.acts).with_context(|| {
        format!(
            "{} is not an activation store from `sae harvest`",
            o.acts.display()
        )
    })?;
    let hook = o.hook.clone().unwrap_or_else(|| manifest.hook.clone());
    if hook != manifest.hook {
        bail!(
            "--hook {hook} differs from the hook of the activation store {} ({})",
            o.acts.display(),
            manifest.hook
        );
    }
    let corpus = o.corpus.clone().unwrap_or_else(|| manifest.corpus.clone());
    let skip = if corpus == manifest.corpus {
        manifest.n_tokens
    } else {
        0
    };
    let model = LanguageModel::load_with_products(&o.model, o.products)?;
    let width = eval::hook_width(&model, &hook)?;
    if width != manifest.d_in {
        bail!(
            "activation store {} is {} wide but hook '{hook}' of model '{}' is {width} wide; use the model it was harvested from",
            o.acts.display(),
            manifest.d_in,
            o.model
        );
    }
    sae_output::mark(&o.out, sae_output::OutputKind::Sweep)
        .and_then(|()| std::fs::create_dir_all(o.out.join("runs")))
        .with_context(|| format!("creating {}", o.out.display()))?;
    let data = EvalData::load(
        &model,
        &corpus,
        &hook,
        o.eval_tokens,
        o.ctx,
        o.eval_batch,
        skip,
    )?;

    let mp = ProgressGroup::new();
    eprintln!(
        "sweep: {} runs on {} ({} tokens at {hook}); evaluation on {} contexts of {} from '{corpus}' after {skip} tokens",
        runs.len(),
        o.acts.display(),
        manifest.n_tokens,
        data.n_contexts(),
        o.ctx
    );
    let base_bar = bar(Some(&mp), 3 * data.n_batches() as u64, "baseline CE");
    let bars: Vec<Progress> = runs
        .iter()
        .map(|r| {
            let b = bar(Some(&mp), 1, &r.name);
            b.set_message("queued");
            b
        })
        .collect();
    let base = eval::baseline(&model, &data, &mut |d, _| {
        base_bar.set_position(d as u64);
        Ok(())
    })?;
    base_bar.finish_with_message(format!(
        "clean {:.4}, zero-ablated {:.4}, mean-ablated {:.4}",
        base.ce_clean, base.ce_zero, base.ce_mean_ablation
    ));

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (run, b) in runs.iter().zip(&bars) {
        match sweep_one(o, run, b, &model, &data, &base) {
            Ok(row) => {
                b.finish_with_message(format!(
                    "done: L0 {:.1}, delta LM loss {:.4}, FVU {:.3}, gamma {:.3}",
                    row.eval.l0, row.eval.delta_lm_loss, row.eval.fvu, row.eval.gamma
                ));
                rows.push(row);
            }
            Err(e) => {
                b.abandon_with_message(format!("FAILED: {e:#}"));
                failed.push((run.name.clone(), format!("{e:#}")));
            }
        }
        write_summary(o, &hook, &manifest, &rows, &failed)?;
    }
    let comparison = write_summary(o, &hook, &manifest, &rows, &failed)?;
    Ok(SweepResult {
        rows,
        failed,
        comparison,
    })
}

/// Train (unless `runs/<name>` already holds a finished SAE) and evaluate one run.
fn sweep_one(
    o: &SweepOptions,
    run: &RunSpec,
    b: &Progress,
    model: &LanguageModel,
    data: &EvalData,
    base: &eval::Baseline,
) -> Result<SweepRow> {
    let dir = o.out.join("runs").join(&run.name);
    let summary_path = dir.join(sae_train::run::SUMMARY_FILE);
    let finished: Option<sae_train::TrainSummary> = if summary_path.is_file() {
        let text = std::fs::read_to_string(&summary_path)?;
        Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a training summary", summary_path.display()))?,
        )
    } else {
        None
    };
    let steps = o
        .steps
        .or(o.tokens.map(|t| t.div_ceil(o.batch_size as u64)));
    let extend = o.extend
        && finished
            .as_ref()
            .is_some_and(|s| steps.is_some_and(|n| n > s.steps));
    let summary = if let (Some(s), false) = (finished, extend) {
        s
    } else {
        let cfg = sae_train::TrainConfig {
            acts: Some(o.acts.clone()),
            out: dir.clone(),
            arch: run.arch,
            d_sae: o.d_sae,
            l1: run.l1,
            k: run.k.unwrap_or(32),
            batch_size: o.batch_size,
            lr: o.lr,
            steps: o.steps,
            tokens: o.tokens,
            seed: o.seed,
            quiet: true,
            checkpoint_every: 0,
            extend,
            keep_state: o.keep_state,
            // At least 50 log windows per run, so the settling table can go back several
            // doublings of tokens even for short runs (every 100 steps for long ones).
            log_every: steps.map_or(100, |steps| (steps / 50).clamp(1, 100)),
            ..Default::default()
        };
        b.set_message(if extend { "extending" } else { "training" });
        // The trainer draws no bar here; a watcher shows its step from the log.
        let done = std::sync::atomic::AtomicBool::new(false);
        let summary = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(step) = training_step(&dir) {
                        b.set_position(step);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            });
            b.set_length(steps.unwrap_or(0).max(1));
            let r = sae_train::run(&cfg);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        })?;
        summary
    };
    b.set_length(summary.steps);
    b.set_position(summary.steps);
    b.set_message(format!(
        "trained {} tokens in {:.0}s; evaluating",
        summary.tokens, summary.seconds
    ));
    let sae = saelens::load(&dir)?;
    let n = data.n_batches() as u64;
    let r = eval::evaluate_sae(
        model,
        &sae,
        &dir.display().to_string(),
        data,
        base,
        eval::trained_max_norm(&dir),
        &mut |d, _| {
            b.set_message(format!("evaluating {d}/{n}"));
            Ok(())
        },
    )?;
    report::write_eval(&dir.join("eval"), &r)?;
    // One read of the training log; the last doubling is the last entry.
    let by_doubling = sae_train::info::convergence_by_doubling_in(&dir);
    Ok(SweepRow {
        run: run.clone(),
        train_tokens: summary.tokens,
        train_seconds: summary.seconds,
        eval: r,
        convergence: by_doubling.last().cloned(),
        by_doubling,
    })
}

/// sweep.json, sweep.csv, report.md and the plots, each replaced atomically.
fn write_summary(
    o: &SweepOptions,
    hook: &str,
    manifest: &sae_store::writer::Manifest,
    rows: &[SweepRow],
    failed: &[(String, String)],
) -> Result<Option<sweep::Comparison>> {
    let setup = format!(
        "Model `{}`, hook `{hook}`, activation store `{}` ({} tokens from corpus `{}`, context {}). \
         Dictionary size {}. Evaluation: {} contexts of {} tokens held out (after the store's text), \
         BOS never spliced and left out of every metric; the model's weight products ran in {}. {}",
        o.model,
        o.acts.display(),
        manifest.n_tokens,
        manifest.corpus,
        manifest.context_size,
        o.d_sae.map(|d| d.to_string()).unwrap_or_else(|| format!("8 x {}", manifest.d_in)),
        rows.first().map(|r| r.eval.n_contexts).unwrap_or(0),
        o.ctx,
        o.products,
        o.note
    );
    write_outputs(&o.out, &setup, rows, failed)
}

/// sweep.json, sweep.csv, the plots and report.md of a sweep directory, with the gated-vs-relu
/// comparison when both are in it (returned).
fn write_outputs(
    out: &Path,
    setup: &str,
    rows: &[SweepRow],
    failed: &[(String, String)],
) -> Result<Option<sweep::Comparison>> {
    let has = |a: ArchKind| rows.iter().any(|r| r.run.arch == a);
    let cmp = (has(ArchKind::GATED) && has(ArchKind::RELU))
        .then(|| sweep::compare(rows, "gated", "relu"));
    let json =
        serde_json::json!({ "setup": setup, "runs": rows, "failed": failed, "comparison": cmp });
    saelens::write_atomic(
        &out.join("sweep.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    saelens::write_atomic(&out.join("sweep.csv"), sweep::csv(rows).as_bytes())?;
    if let Some(first) = rows.first() {
        // Plots go to a temp dir first, then each is renamed over the old one.
        let tmp = out.join(format!(".plots.tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let title = format!("{} {}", first.eval.model, first.eval.hook);
        let drawn = sweep::write_plots(&tmp, rows, &title);
        if drawn.is_ok() {
            for f in ["l0_vs_delta_loss.png", "l0_vs_fvu.png", "gamma.png"] {
                std::fs::rename(tmp.join(f), out.join(f))?;
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        drawn?;
    }
    let md = sweep::markdown("SAE sweep", setup, rows, failed, cmp.as_ref());
    saelens::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(cmp)
}

/// `sae sweep --report-only`: redraw report.md, sweep.csv and the plots of a finished (or
/// interrupted) sweep from its sweep.json, training and evaluating nothing. Each run's
/// settling numbers are re-read from its training log when it has one.
pub fn rerender(out: &Path) -> Result<SweepResult> {
    let path = out.join("sweep.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: --report-only needs a directory written by `sae sweep`",
            path.display()
        )
    })?;
    #[derive(serde::Deserialize)]
    struct Saved {
        setup: String,
        runs: Vec<SweepRow>,
        failed: Vec<(String, String)>,
    }
    let mut saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a sweep summary from `sae sweep`", path.display()))?;
    for r in &mut saved.runs {
        let dir = out.join("runs").join(&r.run.name);
        let steps = sae_train::info::convergence_by_doubling_in(&dir);
        if !steps.is_empty() {
            r.convergence = steps.last().cloned();
            r.by_doubling = steps;
        }
    }
    let comparison = write_outputs(out, &saved.setup, &saved.runs, &saved.failed)?;
    Ok(SweepResult {
        rows: saved.runs,
        failed: saved.failed,
        comparison,
    })
}

/// Sizes of `sae demo`.
#[derive(Clone, Debug)]
pub struct DemoPlan {
    pub harvest_tokens: usize,
    pub d_sae: usize,
    pub train_tokens: u64,
    pub batch_size: usize,
    /// One learning rate for both architectures: runs this short are far from the paper's
    /// 300k steps, and a shared rate keeps the comparison fair.
    pub lr: f32,
    pub gated_l1: Vec<f32>,
    pub relu_l1: Vec<f32>,
    pub eval_tokens: usize,
}

pub const DEMO_MODEL: &str = "smollm2-135m";
pub const DEMO_HOOK: &str = "blocks.15.hook_resid_post";
pub const DEMO_CORPUS: &str = "python-docs";
const DEMO_CTX: usize = 128;

impl DemoPlan {
    /// The demo: 8 x 576 latents, three sparsity settings per architecture, about 20 minutes on
    /// a 2-core machine. The coefficient ranges come from calibration runs on this model and
    /// hook (the paper's λ are not comparable across architectures; at equal λ our relu SAEs
    /// are about 5x sparser than gated ones). `--quick`: one run per architecture on a tiny
    /// budget, a smoke test of a few minutes.
    pub fn new(quick: bool) -> DemoPlan {
        if quick {
            DemoPlan {
                harvest_tokens: 32_000,
                d_sae: 4 * 576,
                train_tokens: 256_000,
                batch_size: 512,
                lr: 1e-3,
                gated_l1: vec![4.0],
                relu_l1: vec![1.0],
                eval_tokens: 2_000,
            }
        } else {
            DemoPlan {
                harvest_tokens: 150_000,
                d_sae: 8 * 576,
                train_tokens: 800_000,
                batch_size: 1024,
                lr: 1e-3,
                gated_l1: vec![2.0, 4.0, 8.0],
                relu_l1: vec![0.5, 1.0, 2.0],
                eval_tokens: 6_000,
            }
        }
    }
}

/// Harvest `n` tokens of `hook` activations into `dir` (kept when already complete).
fn harvest_into(
    model: &LanguageModel,
    dir: &Path,
    hook: &str,
    corpus: &str,
    n: usize,
) -> Result<()> {
    use sae_store::writer::{Manifest, ShardWriter, StoreDtype};
    if let Ok(m) = Manifest::read(dir) {
        if m.complete && m.n_tokens >= n && m.hook == hook && m.corpus == corpus {
            eprintln!("demo: reusing {} ({} tokens)", dir.display(), m.n_tokens);
            return Ok(());
        }
    }
    let width = eval::hook_width(model, hook)?;
    let rows_per_ctx = DEMO_CTX - 1;
    let template = Manifest {
        model: model.name.clone(),
        hook: hook.to_string(),
        d_in: width,
        context_size: DEMO_CTX,
        n_tokens: 0,
        corpus: corpus.to_string(),
        dtype: StoreDtype::F32,
        shards: Vec::new(),
        complete: false,
        target_tokens: n,
        bos_excluded: true,
        has_tokens: false,
        compute: Some("f32".into()),
        grads: None,
    };
    let mut writer = ShardWriter::open(dir, template, 256 * rows_per_ctx)?;
    let done = writer.rows_done();
    if done < n {
        let contexts = sae_lm::corpus::pack_corpus(corpus, model.tokenizer(), DEMO_CTX, n, 0)?;
        let opts = sae_lm::harvest::HarvestOptions {
            batch: 16,
            include_bos: false,
            max_rows: n - done,
            first_context: done / rows_per_ctx,
            progress: true,
        };
        let stats = sae_lm::harvest::harvest(model, &contexts, hook, &opts, |rows| {
            writer.push(rows.acts, rows.tokens, rows.positions)
        })?;
        eprintln!(
            "demo: harvested {} tokens in {:.0}s ({:.0} tokens/s)",
            stats.rows,
            stats.seconds,
            stats.rows as f64 / stats.seconds.max(1e-9)
        );
    }
    writer.finish()?;
    Ok(())
}

/// `sae demo`: harvest, gated-vs-relu sweep, evaluation, report with plots.
pub fn run_demo(out: &Path, quick: bool) -> Result<SweepResult> {
    let plan = DemoPlan::new(quick);
    let t0 = Instant::now();
    eprintln!("demo: {plan:?}");
    sae_output::check_output(out, sae_output::OutputKind::Sweep, &[], false)?;
    sae_output::mark(out, sae_output::OutputKind::Sweep)
        .with_context(|| format!("creating {}", out.display()))?;
    let model = LanguageModel::load(DEMO_MODEL)?;
    let acts = out.join("acts");
    harvest_into(&model, &acts, DEMO_HOOK, DEMO_CORPUS, plan.harvest_tokens)?;
    let harvest_s = t0.elapsed().as_secs_f64();
    drop(model);
    let o = SweepOptions {
        acts,
        archs: vec![ArchKind::GATED, ArchKind::RELU],
        l1: Vec::new(),
        l1_by_arch: vec![
            (ArchKind::GATED, plan.gated_l1.clone()),
            (ArchKind::RELU, plan.relu_l1.clone()),
        ],
        k: Vec::new(),
        d_sae: Some(plan.d_sae),
        steps: None,
        tokens: Some(plan.train_tokens),
        batch_size: plan.batch_size,
        lr: Some(plan.lr),
        model: DEMO_MODEL.into(),
        hook: Some(DEMO_HOOK.into()),
        corpus: Some(DEMO_CORPUS.into()),
        eval_tokens: plan.eval_tokens,
        ctx: DEMO_CTX,
        eval_batch: 8,
        seed: 0,
        out: out.to_path_buf(),
        extend: false,
        keep_state: false,
        products: ProductPrecision::F32,
        note: format!(
            "Demo{}: {} harvested tokens, {} training tokens per run (batch {}, lr {}), gated l1 {:?}, relu l1 {:?}; harvest took {harvest_s:.0}s.",
            if quick { " (--quick)" } else { "" },
            plan.harvest_tokens,
            plan.train_tokens,
            plan.batch_size,
            plan.lr,
            plan.gated_l1,
            plan.relu_l1
        ),
    };
    let all = run_sweep(&o)?;
    eprintln!(
        "demo: done in {:.0}s; report {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(all)
}
