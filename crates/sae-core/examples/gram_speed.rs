//! Times the symmetric Gram product (`kernels::gram`, used by matching pursuit) against the
//! full product `W W^T` at d_sae 4096, d_in 768, interleaved in one process:
//! `cargo run --release -p sae-core --example gram_speed`.
use std::time::Instant;

fn main() {
    let (m, d) = (4096usize, 768usize);
    let mut s = 1u64;
    let w: Vec<f32> = (0..m * d)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let mut out = vec![0f32; m * m];
    for round in 0..6 {
        let t = Instant::now();
        sae_core::kernels::matmul_xt(&w, m, d, &w, m, &mut out);
        let full = t.elapsed().as_secs_f64();
        let t = Instant::now();
        sae_core::kernels::gram(&w, m, d, &mut out);
        let half = t.elapsed().as_secs_f64();
        println!(
            "round {round}: full {:.0} ms, symmetric {:.0} ms, ratio {:.2}",
            full * 1e3,
            half * 1e3,
            full / half
        );
    }
}
