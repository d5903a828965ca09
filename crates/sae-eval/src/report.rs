//! The `sae eval` report, written whole and renamed into place.

use crate::eval::EvalReport;
use crate::plot;
use anyhow::Result;
use std::fmt::Write as _;
use std::path::Path;

/// `eval.json`, `report.md` and `firing_hist.png` for one SAE into `out`.
pub fn write_eval(out: &Path, r: &EvalReport) -> Result<()> {
    sae_output::replace_dir(out, |dir| -> Result<()> {
        std::fs::write(dir.join("eval.json"), serde_json::to_string_pretty(r)?)?;
        plot::firing_histogram(
            &dir.join("firing_hist.png"),
            &format!("Latent firing frequency: {}", short_name(&r.sae)),
            &r.firing.hist,
            r.firing.dead,
        )?;
        std::fs::write(dir.join("report.md"), eval_markdown(r))?;
        Ok(())
    })
}

/// The last path component of an SAE directory, for titles.
pub fn short_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.to_string())
}

/// A short Markdown report of one evaluation.
pub fn eval_markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# SAE evaluation: {}\n", short_name(&r.sae));
    let _ = writeln!(
        s,
        "{} SAE, d_in {}, d_sae {}, at `{}` of `{}`. Held-out text: corpus `{}` after skipping \
         its first {} tokens (the SAE's training text), {} contexts of {} tokens. BOS is not \
         replaced and is excluded from the reconstruction metrics and from every CE. The \
         model's weight products ran in {}.\n",
        r.arch,
        r.d_in,
        r.d_sae,
        r.hook,
        r.model,
        r.corpus,
        r.skip_tokens,
        r.n_contexts,
        r.context_size,
        r.compute
    );
    let _ = writeln!(s, "| metric | value |\n|---|---|");
    let rows: [(&str, String); 15] = [
        ("L0 (active latents per token)", format!("{:.2}", r.l0)),
        (
            "FVU (fraction of variance unexplained)",
            format!("{:.4}", r.fvu),
        ),
        (
            "MSE (sum over d_in, mean over tokens)",
            format!("{:.4}", r.mse),
        ),
        (
            "gamma = E‖x̂‖² / E[x̂·x] (1 = no shrinkage)",
            format!("{:.4}", r.gamma),
        ),
        ("CE clean (nats/token)", format!("{:.4}", r.ce_clean)),
        ("CE with SAE spliced in", format!("{:.4}", r.ce_sae)),
        ("CE zero-ablated", format!("{:.4}", r.ce_zero)),
        ("CE mean-ablated", format!("{:.4}", r.ce_mean_ablation)),
        (
            "delta LM loss (CE_sae − CE_clean)",
            format!("{:.4}", r.delta_lm_loss),
        ),
        (
            "fraction of loss recovered (vs zero ablation)",
            format!("{:.4}", r.loss_recovered),
        ),
        (
            "fraction of loss recovered (vs mean ablation)",
            format!("{:.4}", r.loss_recovered_vs_mean),
        ),
        (
            "dead latents (never fired)",
            format!("{} of {}", r.firing.dead, r.firing.n_latents),
        ),
        (
            "dense latents",
            format!(
                "{} (fire on > {:.0}% of tokens)",
                r.firing.dense,
                r.firing.dense_fraction * 100.0
            ),
        ),
        (
            "tokens in reconstruction metrics",
            format!("{}", r.n_tokens),
        ),
        (
            "tokens left unspliced (norm over the training limit)",
            match r.max_norm {
                Some(m) => format!("{} (limit {m:.1})", r.n_unspliced),
                None => "0 (no limit)".to_string(),
            },
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n![firing-frequency histogram](firing_hist.png)");
    s
}
