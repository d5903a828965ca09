//! Time a few training steps from the paper's init (dense early phase):
//! `cargo run --release -p sae-core --example init_step [arch] [d_sae] [steps]`
use sae_core::{ArchKind, Sae, SaeTrainer, TrainHyper};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arch: ArchKind = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(ArchKind::GATED);
    let d_sae: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(9216);
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let (d_in, batch) = (576, 4096);
    let x: Vec<f32> = (0..batch * d_in)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let mut tr = SaeTrainer::new(Sae::init(arch, d_in, d_sae, 64, 0), TrainHyper::default());
    for s in 0..steps {
        let t0 = Instant::now();
        let st = tr.step(&x, batch, 1e-4, 1e-3);
        println!(
            "step {s}: {:.2}s, l0 {:.0}, loss {:.4}",
            t0.elapsed().as_secs_f64(),
            st.l0,
            st.loss
        );
    }
    Ok(())
}
