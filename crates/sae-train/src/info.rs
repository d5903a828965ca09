//! `sae info DIR`: what an SAE directory holds.

use crate::run::{TrainSummary, LOG_FILE, SUMMARY_FILE};
use anyhow::{Context, Result};
use sae_core::saelens::WEIGHTS_FILE;
use std::fmt::Write;
use std::path::Path;

pub fn describe(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{}: not a directory (expected an SAE directory with cfg.json)",
            dir.display()
        );
    }
    let sae = sae_core::saelens::load(dir)?;
    let mut s = String::new();
    let m = &sae.meta;
    writeln!(s, "{}", dir.display())?;
    writeln!(
        s,
        "  arch        {}{}",
        sae.arch,
        if sae.settings.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = sae
                .settings
                .iter()
                .map(|(key, v)| format!("{key} = {}", v.to_string().replace(',', ", ")))
                .collect();
            format!(" ({})", parts.join(", "))
        }
    )?;
    writeln!(s, "  d_in        {}", sae.d_in)?;
    writeln!(s, "  d_sae       {}", sae.d_sae)?;
    writeln!(s, "  model       {}", or_dash(&m.model_name))?;
    writeln!(s, "  hook        {}", or_dash(&m.hook_name))?;
    writeln!(s, "  context     {}", m.context_size)?;
    writeln!(s, "  dataset     {}", or_dash(&m.dataset_path))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).with_context(|| format!("reading {}", wpath.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", wpath.display()))?;
    let mut tensors: Vec<_> = header.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    writeln!(s, "  tensors ({WEIGHTS_FILE}):")?;
    for (name, info) in tensors {
        writeln!(s, "    {name:<10} {:?} {:?}", info.dtype, info.shape)?;
    }
    let summary_path = dir.join(SUMMARY_FILE);
    if summary_path.exists() {
        let text = std::fs::read_to_string(&summary_path)?;
        let t: TrainSummary = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid training summary", summary_path.display()))?;
        let f = &t.final_metrics;
        writeln!(
            s,
            "  training    {} steps, {} tokens, {:.1} s ({:.0} tokens/s)",
            t.steps, t.tokens, t.seconds, t.tokens_per_s
        )?;
        writeln!(
            s,
            "              lr {:e}, sparsity coeff {}, input scale {} (folded into the weights)",
            t.resolved.lr, t.resolved.sparsity_coeff, t.scale
        )?;
        for e in &t.extensions {
            writeln!(
                s,
                "  extended    from step {} ({} tokens), {}",
                e.from_step,
                tokens_short(e.from_tokens),
                if e.optimizer_state_kept {
                    "with its kept optimiser state (exact continuation)"
                } else {
                    "with fresh Adam moments and a new lr warm-up (no kept state)"
                }
            )?;
        }
        let kept = crate::checkpoint::dir(dir);
        if kept.is_dir() {
            writeln!(
                s,
                "  kept state  {} (`sae train --extend` continues from it)",
                kept.display()
            )?;
        }
        writeln!(
            s,
            "  final       L0 {:.2}, FVU {:.4}, MSE {:.4}, gamma {:.3}, dead {} / {} (on {} tokens)",
            f.l0, f.fvu, f.mse, f.gamma, f.dead_latents, t.d_sae, f.eval_tokens
        )?;
        let log = dir.join(LOG_FILE);
        if let Ok(text) = std::fs::read_to_string(&log) {
            writeln!(
                s,
                "  log         {} ({} lines)",
                log.display(),
                text.lines().count()
            )?;
        }
        let steps = convergence_by_doubling_in(dir);
        if let Some(c) = steps.last() {
            writeln!(
                s,
                "  settling    training {} from half-way to the end (the last doubling of tokens)",
                c.changes()
            )?;
        }
        if steps.len() > 1 {
            writeln!(
                s,
                "  by doubling training FVU and L0 change over each doubling of tokens:"
            )?;
            for c in &steps {
                writeln!(
                    s,
                    "              {:>7} -> {:>7} tokens: {}",
                    tokens_short(c.tokens / 2),
                    tokens_short(c.tokens),
                    c.changes()
                )?;
            }
        }
    } else {
        writeln!(
            s,
            "  training    no {SUMMARY_FILE} (not trained by `sae train`)"
        )?;
    }
    Ok(s)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// How much a run was still moving when it stopped: training-batch FVU and L0 averaged over
/// the log windows of the last tenth of training, against the same-length stretch that ends
/// halfway. The change between them is what the last doubling of tokens bought; a run has
/// settled when that is small.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Convergence {
    /// Training tokens at the end of the run.
    pub tokens: u64,
    pub fvu_half: f64,
    pub fvu_end: f64,
    pub l0_half: f64,
    pub l0_end: f64,
}

impl Convergence {
    /// Relative change of FVU over the last doubling of tokens ((end - half) / half).
    pub fn fvu_change(&self) -> f64 {
        (self.fvu_end - self.fvu_half) / self.fvu_half
    }
    /// Relative change of L0 over the last doubling of tokens.
    pub fn l0_change(&self) -> f64 {
        (self.l0_end - self.l0_half) / self.l0_half
    }
    /// "FVU a -> b (+x%), L0 c -> d (+y%)".
    pub fn changes(&self) -> String {
        format!(
            "FVU {:.4} -> {:.4} ({:+.1}%), L0 {:.1} -> {:.1} ({:+.1}%)",
            self.fvu_half,
            self.fvu_end,
            100.0 * self.fvu_change(),
            self.l0_half,
            self.l0_end,
            100.0 * self.l0_change()
        )
    }
}

/// A token count in a few characters: 16.00M, 500.0k, 640.
pub fn tokens_short(t: u64) -> String {
    match t {
        0..=9_999 => t.to_string(),
        10_000..=999_999 => format!("{:.1}k", t as f64 / 1e3),
        _ => format!("{:.2}M", t as f64 / 1e6),
    }
}

/// (tokens, training FVU, L0) of every window in the text of a `train_log.jsonl`.
fn log_points(text: &str) -> Vec<(u64, f64, f64)> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["tokens"].as_u64()?, v["fvu"].as_f64()?, v["l0"].as_f64()?)))
        .collect()
}

/// Convergence of the run as it stood after `total` tokens: windows in (0.4 T, 0.5 T] against
/// (0.9 T, T]; `None` when either stretch has no window.
fn convergence_at(points: &[(u64, f64, f64)], total: u64) -> Option<Convergence> {
    let mean_in = |lo: f64, hi: f64| -> Option<(f64, f64)> {
        let sel: Vec<_> = points
            .iter()
            .filter(|p| (p.0 as f64) > lo * total as f64 && (p.0 as f64) <= hi * total as f64)
            .collect();
        if sel.is_empty() {
            return None;
        }
        let n = sel.len() as f64;
        Some((
            sel.iter().map(|p| p.1).sum::<f64>() / n,
            sel.iter().map(|p| p.2).sum::<f64>() / n,
        ))
    };
    let (fvu_half, l0_half) = mean_in(0.4, 0.5)?;
    let (fvu_end, l0_end) = mean_in(0.9, 1.0)?;
    (fvu_half > 0.0 && l0_half > 0.0).then_some(Convergence {
        tokens: total,
        fvu_half,
        fvu_end,
        l0_half,
        l0_end,
    })
}

/// Convergence from the text of a `train_log.jsonl`; `None` when the log is too short to have
/// a window in both stretches ((0.4 T, 0.5 T] and (0.9 T, T] of the T tokens).
pub fn convergence_from_log(text: &str) -> Option<Convergence> {
    let points = log_points(text);
    convergence_at(&points, points.iter().map(|p| p.0).max()?)
}

/// The same measure at every doubling of tokens the log covers, earliest first: the run cut
/// at T, T/2, T/4, ... (down to where a tenth of T holds no log window). How fast the change
/// per doubling shrinks says how many more tokens the run needs to settle.
pub fn convergence_by_doubling(text: &str) -> Vec<Convergence> {
    let points = log_points(text);
    let mut out = Vec::new();
    let mut t = points.iter().map(|p| p.0).max().unwrap_or(0);
    while let Some(c) = convergence_at(&points, t) {
        out.push(c);
        t /= 2;
    }
    out.reverse();
    out
}

/// [`convergence_by_doubling`] of the run in `dir`, from its `train_log.jsonl`.
pub fn convergence_by_doubling_in(dir: &Path) -> Vec<Convergence> {
    std::fs::read_to_string(dir.join(LOG_FILE))
        .map(|t| convergence_by_doubling(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(points: &[(u64, f64, f64)]) -> String {
        points
            .iter()
            .map(|(t, f, l)| format!("{{\"step\":1,\"tokens\":{t},\"fvu\":{f},\"l0\":{l}}}\n"))
            .collect()
    }

    #[test]
    fn convergence_compares_the_last_tenth_with_the_tenth_before_half() {
        // 20 windows of 100 tokens; FVU 1/step-index, L0 constant 10 then 20 after half.
        let pts: Vec<_> = (1..=20u64)
            .map(|i| (i * 100, 1.0 / i as f64, if i <= 10 { 10.0 } else { 20.0 }))
            .collect();
        let c = convergence_from_log(&log(&pts)).unwrap();
        assert_eq!(c.tokens, 2000);
        // (0.4 T, 0.5 T] = tokens 900 and 1000 (i = 9, 10); (0.9 T, T] = i = 19, 20.
        assert!((c.fvu_half - (1.0 / 9.0 + 1.0 / 10.0) / 2.0).abs() < 1e-12);
        assert!((c.fvu_end - (1.0 / 19.0 + 1.0 / 20.0) / 2.0).abs() < 1e-12);
        assert_eq!((c.l0_half, c.l0_end), (10.0, 20.0));
        assert!((c.l0_change() - 1.0).abs() < 1e-12);
        assert!(c.fvu_change() < -0.5);
    }

    #[test]
    fn convergence_by_doubling_cuts_the_run_at_each_halving() {
        // 40 windows of 100 tokens, FVU 1 / tokens: each doubling halves it exactly, so every
        // cut reports about -50% (windows are averaged, so not exactly).
        let pts: Vec<_> = (1..=40u64)
            .map(|i| (i * 100, 1.0 / (i * 100) as f64, 5.0))
            .collect();
        let steps = convergence_by_doubling(&log(&pts));
        let ends: Vec<u64> = steps.iter().map(|c| c.tokens).collect();
        // 4000, 2000, 1000 have windows in both stretches; 500 has none in (0.9 T, T]...
        // (450, 500] holds 500, (200, 250] none: it stops at 1000.
        assert_eq!(ends, vec![1000, 2000, 4000]);
        assert_eq!(steps.last(), convergence_from_log(&log(&pts)).as_ref());
        for c in &steps {
            assert!((c.fvu_change() + 0.5).abs() < 0.1, "{c:?}");
            assert_eq!(c.l0_change(), 0.0);
        }
        // At T = 1000: (400, 500] = {500}, (900, 1000] = {1000}: exactly -50%.
        assert!((steps[0].fvu_change() + 0.5).abs() < 1e-12);
        assert!(convergence_by_doubling("").is_empty());
        assert_eq!(
            [640, 32_000, 500_000, 16_000_000].map(tokens_short),
            ["640", "32.0k", "500.0k", "16.00M"]
        );
    }

    #[test]
    fn convergence_needs_windows_in_both_stretches() {
        assert_eq!(convergence_from_log(&log(&[(100, 0.5, 3.0)])), None);
        assert_eq!(convergence_from_log(""), None);
        assert_eq!(convergence_from_log("not json\n"), None);
    }
}
