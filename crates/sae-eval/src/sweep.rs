//! Sweeps: the grid of (architecture, sparsity setting) runs, their summary table, the
//! Figure-1 style plots, and the gated-vs-relu comparison at matched delta LM loss.

use crate::eval::EvalReport;
use crate::metrics::interpolate;
use crate::plot;
use anyhow::{bail, Result};
use sae_core::ArchKind;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// One run of the grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub name: String,
    pub arch: ArchKind,
    /// Sparsity coefficient (gated, relu: L1; jumprelu: L0).
    pub l1: Option<f32>,
    /// Active latents (topk, batchtopk).
    pub k: Option<usize>,
}

impl RunSpec {
    /// "l1=0.5" or "k=32".
    pub fn setting(&self) -> String {
        match (self.l1, self.k) {
            (Some(l), _) => format!("l1={l}"),
            (_, Some(k)) => format!("k={k}"),
            _ => String::new(),
        }
    }
}

/// Whether an architecture's sparsity is set with `--l1` (else with `--k`).
pub fn uses_l1(a: ArchKind) -> bool {
    !a.uses_k()
}

/// The grid: `--l1` values for gated/relu/jumprelu, `--k` values for topk/batchtopk.
/// An architecture with no values for its setting, or an empty grid, is an error.
pub fn grid(archs: &[ArchKind], l1: &[f32], k: &[usize]) -> Result<Vec<RunSpec>> {
    if archs.is_empty() {
        bail!("the sweep grid is empty: give --arch (e.g. --arch gated,relu)");
    }
    let mut runs = Vec::new();
    for &a in archs {
        if uses_l1(a) {
            if l1.is_empty() {
                bail!("the sweep grid has no runs for {a}: give --l1 values (e.g. --l1 1,2,4)");
            }
            for &v in l1 {
                if !(v.is_finite() && v >= 0.0) {
                    bail!("--l1 {v}: sparsity coefficients must be non-negative numbers");
                }
                runs.push(RunSpec {
                    name: format!("{a}-l1_{v}"),
                    arch: a,
                    l1: Some(v),
                    k: None,
                });
            }
        } else {
            if k.is_empty() {
                bail!("the sweep grid has no runs for {a}: give --k values (e.g. --k 16,32,64)");
            }
            for &v in k {
                if v == 0 {
                    bail!("--k 0: k must be at least 1");
                }
                runs.push(RunSpec {
                    name: format!("{a}-k{v}"),
                    arch: a,
                    l1: None,
                    k: Some(v),
                });
            }
        }
    }
    let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("the sweep grid repeats a run (duplicate --arch, --l1 or --k values)");
    }
    Ok(runs)
}

/// The grid with per-architecture sparsity coefficients: an architecture listed in `l1_by_arch`
/// takes its own values (gated and relu coefficients are not comparable: the paper's λ differ
/// by orders of magnitude), the others take `l1`.
pub fn grid_per_arch(
    archs: &[ArchKind],
    l1: &[f32],
    l1_by_arch: &[(ArchKind, Vec<f32>)],
    k: &[usize],
) -> Result<Vec<RunSpec>> {
    if archs.is_empty() {
        bail!("the sweep grid is empty: give --arch (e.g. --arch gated,relu)");
    }
    if let Some((a, _)) = l1_by_arch.iter().find(|(a, _)| !archs.contains(a)) {
        bail!("--l1 {a}=...: {a} is not among the --arch values");
    }
    let mut runs = Vec::new();
    for &a in archs {
        let own = l1_by_arch
            .iter()
            .find(|(b, _)| *b == a)
            .map(|(_, v)| &v[..]);
        runs.extend(grid(&[a], own.unwrap_or(l1), k)?);
    }
    let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!("the sweep grid repeats a run (duplicate --arch, --l1 or --k values)");
    }
    Ok(runs)
}

/// One finished run: its training numbers and evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepRow {
    pub run: RunSpec,
    pub train_tokens: u64,
    pub train_seconds: f64,
    pub eval: EvalReport,
    /// How much the last doubling of training tokens still changed it (from its log).
    #[serde(default)]
    pub convergence: Option<sae_train::info::Convergence>,
    /// The same at every doubling of tokens the log covers, earliest first.
    #[serde(default)]
    pub by_doubling: Vec<sae_train::info::Convergence>,
}

/// L0 of two architectures compared at matched delta LM loss.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    /// (delta LM loss, L0 of a, L0 of b) at the matched points.
    pub matched: Vec<(f64, f64, f64)>,
    /// Geometric mean of L0_b / L0_a over the matched points (> 1: a needs fewer latents).
    pub l0_ratio_b_over_a: Option<f64>,
    pub verdict: String,
}

/// Compare L0 at matched delta LM loss: each architecture's points (delta LM loss, log L0)
/// are joined in order of delta LM loss and interpolated linearly; the curves are compared
/// at 5 evenly spaced delta LM losses across the range both cover (no extrapolation).
pub fn compare(rows: &[SweepRow], a: &str, b: &str) -> Comparison {
    let curve = |arch: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.eval.arch == arch && r.eval.l0 > 0.0 && r.eval.delta_lm_loss.is_finite())
            .map(|r| (r.eval.delta_lm_loss, r.eval.l0.ln()))
            .collect()
    };
    let (ca, cb) = (curve(a), curve(b));
    let span = |c: &[(f64, f64)]| {
        let lo = c.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = c.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let mut out = Comparison {
        a: a.into(),
        b: b.into(),
        matched: Vec::new(),
        l0_ratio_b_over_a: None,
        verdict: String::new(),
    };
    if ca.is_empty() || cb.is_empty() {
        out.verdict = format!("no comparison: the sweep has no finished {a} or {b} runs");
        return out;
    }
    let ((la, ha), (lb, hb)) = (span(&ca), span(&cb));
    let (lo, hi) = (la.max(lb), ha.min(hb));
    if lo > hi {
        out.verdict = format!(
            "no comparison at matched delta LM loss: the {a} runs span [{la:.4}, {ha:.4}] and the \
             {b} runs [{lb:.4}, {hb:.4}], which do not overlap; widen the --l1 values"
        );
        return out;
    }
    let n = if hi > lo { 5 } else { 1 };
    for i in 0..n {
        let d = if n == 1 {
            lo
        } else {
            lo + (hi - lo) * i as f64 / (n - 1) as f64
        };
        if let (Some(ya), Some(yb)) = (interpolate(&ca, d), interpolate(&cb, d)) {
            out.matched.push((d, ya.exp(), yb.exp()));
        }
    }
    let logs: Vec<f64> = out.matched.iter().map(|m| (m.2 / m.1).ln()).collect();
    let ratio = (logs.iter().sum::<f64>() / logs.len().max(1) as f64).exp();
    out.l0_ratio_b_over_a = Some(ratio);
    let a_wins = out.matched.iter().filter(|m| m.1 < m.2).count();
    out.verdict = if a_wins == out.matched.len() {
        format!(
            "YES: {a} beat {b}: at every matched delta LM loss ({} points in [{lo:.4}, {hi:.4}]) \
             {a} needs fewer active latents; {b} needs {ratio:.2}x the L0 of {a} (geometric mean)",
            out.matched.len()
        )
    } else if a_wins == 0 {
        format!(
            "NO: {a} did not beat {b}: at every matched delta LM loss ({} points in [{lo:.4}, {hi:.4}]) \
             {b} needs no more active latents than {a}; L0 ratio {b}/{a} = {ratio:.2} (geometric mean)",
            out.matched.len()
        )
    } else {
        format!(
            "MIXED: {a} needs fewer active latents than {b} at {a_wins} of {} matched delta LM losses \
             in [{lo:.4}, {hi:.4}]; L0 ratio {b}/{a} = {ratio:.2} (geometric mean)",
            out.matched.len()
        )
    };
    out
}

/// FVU of a curve at `l0`: the curve's (L0, FVU) points joined in order of log L0 and
/// interpolated linearly; `None` outside the L0 range the curve covers.
pub fn fvu_at_l0(curve: &[(f64, f64)], l0: f64) -> Option<f64> {
    if l0.is_nan() || l0 <= 0.0 {
        return None;
    }
    let logs: Vec<(f64, f64)> = curve
        .iter()
        .filter(|p| p.0 > 0.0)
        .map(|p| (p.0.ln(), p.1))
        .collect();
    interpolate(&logs, l0.ln())
}

/// How far each architecture's L0-FVU curve moved over the last doubling of training tokens:
/// for every run, its end point against the FVU that the same architecture's half-way curve
/// has at that L0 (rows: run, L0 end, FVU end, half-way FVU at that L0). Training-batch
/// numbers, from the logs; runs whose L0 falls outside the half-way curve are left out.
pub fn curve_shift(rows: &[SweepRow]) -> Vec<(String, f64, f64, f64)> {
    let mut out = Vec::new();
    for a in archs_of(rows) {
        let runs: Vec<(&str, &sae_train::info::Convergence)> = rows
            .iter()
            .filter(|r| r.eval.arch == a)
            .filter_map(|r| Some((r.run.name.as_str(), r.convergence.as_ref()?)))
            .collect();
        let half: Vec<(f64, f64)> = runs.iter().map(|(_, c)| (c.l0_half, c.fvu_half)).collect();
        if half.len() < 2 {
            continue;
        }
        for (name, c) in &runs {
            if let Some(f) = fvu_at_l0(&half, c.l0_end) {
                out.push((name.to_string(), c.l0_end, c.fvu_end, f));
            }
        }
    }
    out
}

/// Architectures present, in a fixed order.
fn archs_of(rows: &[SweepRow]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for a in ArchKind::all() {
        if rows.iter().any(|r| r.run.arch == a) {
            v.push(a.as_str().to_string());
        }
    }
    v
}

fn series(rows: &[SweepRow], y: impl Fn(&EvalReport) -> f64) -> Vec<(String, Vec<(f64, f64)>)> {
    archs_of(rows)
        .into_iter()
        .map(|a| {
            let pts = rows
                .iter()
                .filter(|r| r.eval.arch == a)
                .map(|r| (r.eval.l0, y(&r.eval)))
                .collect();
            (a, pts)
        })
        .collect()
}

/// `l0_vs_delta_loss.png`, `l0_vs_fvu.png`, `gamma.png` into `dir`.
pub fn write_plots(dir: &Path, rows: &[SweepRow], title: &str) -> Result<()> {
    plot::curves_log_x(
        &dir.join("l0_vs_delta_loss.png"),
        &format!("{title}: L0 vs delta LM loss"),
        "L0 (active latents per token, log scale)",
        "delta LM loss (nats/token)",
        &series(rows, |e| e.delta_lm_loss),
        None,
    )?;
    plot::curves_log_x(
        &dir.join("l0_vs_fvu.png"),
        &format!("{title}: L0 vs FVU"),
        "L0 (active latents per token, log scale)",
        "fraction of variance unexplained",
        &series(rows, |e| e.fvu),
        None,
    )?;
    plot::curves_log_x(
        &dir.join("gamma.png"),
        &format!("{title}: shrinkage gamma per run (1 = none)"),
        "L0 (active latents per token, log scale)",
        "gamma = E|x_hat|^2 / E[x_hat . x]",
        &series(rows, |e| e.gamma),
        Some(1.0),
    )?;
    Ok(())
}

/// The CSV summary, one line per run.
pub fn csv(rows: &[SweepRow]) -> String {
    let mut s = String::from(
        "run,arch,l1,k,d_sae,train_tokens,l0,fvu,mse,gamma,ce_clean,ce_sae,ce_zero,ce_mean_ablation,\
         delta_lm_loss,loss_recovered,dead,dense,fvu_change_last_doubling,l0_change_last_doubling\n",
    );
    for r in rows {
        let e = &r.eval;
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{:.4},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{},{},{}",
            r.run.name,
            e.arch,
            r.run.l1.map(|v| v.to_string()).unwrap_or_default(),
            r.run.k.map(|v| v.to_string()).unwrap_or_default(),
            e.d_sae,
            r.train_tokens,
            e.l0,
            e.fvu,
            e.mse,
            e.gamma,
            e.ce_clean,
            e.ce_sae,
            e.ce_zero,
            e.ce_mean_ablation,
            e.delta_lm_loss,
            e.loss_recovered,
            e.firing.dead,
            e.firing.dense,
            r.convergence
                .as_ref()
                .map(|c| format!("{:.4}", c.fvu_change()))
                .unwrap_or_default(),
            r.convergence
                .as_ref()
                .map(|c| format!("{:.4}", c.l0_change()))
                .unwrap_or_default()
        );
    }
    s
}

/// The Markdown summary: setup, a table of runs, the comparison, the plots.
pub fn markdown(
    title: &str,
    setup: &str,
    rows: &[SweepRow],
    failed: &[(String, String)],
    cmp: Option<&Comparison>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n\n{setup}\n");
    if let Some(c) = cmp {
        let _ = writeln!(s, "## Did {} beat {}?\n\n**{}**\n", c.a, c.b, c.verdict);
        let _ = writeln!(
            s,
            "Method: for each architecture the runs are points (delta LM loss, L0); joined in \
             order of delta LM loss, log L0 is interpolated linearly, and the two curves are \
             compared at evenly spaced delta LM losses inside the range both cover (no \
             extrapolation).\n"
        );
        if !c.matched.is_empty() {
            let _ = writeln!(
                s,
                "| delta LM loss | L0 {} | L0 {} |\n|---|---|---|",
                c.a, c.b
            );
            for (d, la, lb) in &c.matched {
                let _ = writeln!(s, "| {d:.4} | {la:.1} | {lb:.1} |");
            }
            s.push('\n');
        }
    }
    let _ = writeln!(
        s,
        "## Runs\n\n| run | arch | setting | train tokens | L0 | FVU | gamma | CE clean | CE SAE | delta LM loss | loss recovered | dead | dense |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let e = &r.eval;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.4} | {:.3} | {:.4} | {:.4} | {:.4} | {:.3} | {} | {} |",
            r.run.name,
            e.arch,
            r.run.setting(),
            r.train_tokens,
            e.l0,
            e.fvu,
            e.gamma,
            e.ce_clean,
            e.ce_sae,
            e.delta_lm_loss,
            e.loss_recovered,
            e.firing.dead,
            e.firing.dense
        );
    }
    if rows.iter().any(|r| r.convergence.is_some()) {
        let _ = writeln!(
            s,
            "\n## Did the runs settle?\n\nTraining-batch FVU and L0, averaged over the log \
             windows of the last tenth of training and of the tenth that ends half-way: the \
             change is what the last doubling of training tokens bought.\n\n\
             | run | train tokens | FVU half-way | FVU end | change | L0 half-way | L0 end | change |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for r in rows {
            if let Some(c) = &r.convergence {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.4} | {:.4} | {:+.1}% | {:.1} | {:.1} | {:+.1}% |",
                    r.run.name,
                    c.tokens,
                    c.fvu_half,
                    c.fvu_end,
                    100.0 * c.fvu_change(),
                    c.l0_half,
                    c.l0_end,
                    100.0 * c.l0_change()
                );
            }
        }
        if rows.iter().any(|r| r.by_doubling.len() > 1) {
            let _ = writeln!(
                s,
                "\nThe same change at every doubling of tokens (the run cut at T/2, T/4, ...), \
                 earliest first. A run is settling when these shrink towards zero.\n\n\
                 | run | doublings (tokens at the end) | FVU change per doubling | L0 change per doubling |\n\
                 |---|---|---|---|"
            );
            for r in rows.iter().filter(|r| r.by_doubling.len() > 1) {
                let list = |f: &dyn Fn(&sae_train::info::Convergence) -> String| {
                    r.by_doubling.iter().map(f).collect::<Vec<_>>().join(", ")
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    r.run.name,
                    list(&|c| sae_train::info::tokens_short(c.tokens)),
                    list(&|c| format!("{:+.0}%", 100.0 * c.fvu_change())),
                    list(&|c| format!("{:+.0}%", 100.0 * c.l0_change())),
                );
            }
        }
        let shift = curve_shift(rows);
        if !shift.is_empty() {
            let _ = writeln!(
                s,
                "\nThe curve itself: each run's end point against the FVU its architecture's \
                 half-way curve (the runs' half-way points, log L0 interpolated) has at the same \
                 L0. A settled curve changes little here.\n\n\
                 | run | L0 end | FVU end | half-way curve's FVU at that L0 | change |\n\
                 |---|---|---|---|---|"
            );
            for (name, l0, fvu, half) in &shift {
                let _ = writeln!(
                    s,
                    "| {name} | {l0:.1} | {fvu:.4} | {half:.4} | {:+.1}% |",
                    100.0 * (fvu - half) / half
                );
            }
        }
    }
    if let Some(e) = rows.first().map(|r| &r.eval) {
        let _ = writeln!(
            s,
            "\nZero-ablation CE {:.4}, mean-ablation CE {:.4} (same for every run).",
            e.ce_zero, e.ce_mean_ablation
        );
    }
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed runs\n");
        for (name, why) in failed {
            let _ = writeln!(s, "* {name}: {why}");
        }
    }
    let _ = writeln!(
        s,
        "\n## Plots\n\n![L0 vs delta LM loss](l0_vs_delta_loss.png)\n\n![L0 vs FVU](l0_vs_fvu.png)\n\n![gamma](gamma.png)"
    );
    s
}
