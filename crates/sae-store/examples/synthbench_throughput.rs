//! Times the SynthSAEBench generator: construction (with its orthogonalisation) and samples
//! per second. `cargo run --release -p sae-store --example synthbench_throughput -- \
//! [PRESET] [SAMPLES] [ORTHO_STEPS]`.

use sae_store::synthbench::{SynthBench, SynthBenchConfig, PRESET_16K};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args.first().map_or(PRESET_16K, |s| s.as_str());
    let samples: usize = args.get(1).map_or(Ok(200_000), |s| s.parse())?;
    let mut cfg = SynthBenchConfig::preset(preset)?;
    if let Some(steps) = args.get(2) {
        cfg.ortho_steps = steps.parse()?;
    }
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    let bench = SynthBench::new(cfg.clone())?;
    let built = t.elapsed().as_secs_f64();
    println!(
        "{preset}: built in {built:.2} s ({} orthogonalisation steps, {threads} threads)",
        cfg.ortho_steps
    );
    let batch = 4096;
    let d = bench.d_in();
    let mut x = vec![0f32; batch * d];
    let t = Instant::now();
    let mut done = 0;
    let mut checksum = 0f64;
    while done < samples {
        let n = batch.min(samples - done);
        bench.sample_batch(done as u64, &mut x[..n * d], None);
        checksum += x[..n * d].iter().map(|&v| v as f64).sum::<f64>();
        done += n;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{samples} samples in {secs:.2} s: {:.0} samples/s (checksum {checksum:.3e})",
        samples as f64 / secs
    );
    Ok(())
}
