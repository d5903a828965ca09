//! Times shuffled batch reads from a synthetic store, the access pattern of training:
//! `cargo run --release -p sae-store --example read_speed [ROWS] [D_IN]`.

use sae_store::synth::{write_synthetic, SynthConfig};
use sae_store::{ActivationStore, BatchStream, Order};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(Ok(200_000), |s| s.parse())?;
    let d_in: usize = args.next().map_or(Ok(576), |s| s.parse())?;
    let dir = std::env::temp_dir().join(format!("sae-read-speed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let store = dir.join("store");
    let t = Instant::now();
    write_synthetic(
        &store,
        &SynthConfig {
            d_in,
            n_features: 64,
            n_tokens: rows,
            l0: 4.0,
            rows_per_shard: 32_768,
            ..Default::default()
        },
    )?;
    println!(
        "wrote {rows} rows of d_in {d_in} in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let batch = 4096;
    let mut out = vec![0.0f32; batch * d_in];
    // Two passes: the first also brings the files into the page cache.
    for pass in 0..2 {
        let mut stream = BatchStream::new(ActivationStore::open(&store)?, Order::Shuffled, 1);
        let t = Instant::now();
        let mut done = 0;
        while done < rows {
            stream.next_batch(&mut out, batch)?;
            done += batch;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "pass {pass}: {done} shuffled rows in {s:.3} s ({:.0} rows/s, {:.0} MB/s)",
            done as f64 / s,
            (done * d_in * 4) as f64 / s / 1e6
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
