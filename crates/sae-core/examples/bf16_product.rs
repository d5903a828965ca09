//! The encoder product alone at the training shape, f32 (`gemm`) against each bf16 path and
//! the per-step packing of W_enc: `cargo run --release -p sae-core --example bf16_product
//! [n d_in d_sae reps]`.
use sae_core::bf16::{matmul_on, Bf16Path, PackedBf16};
use sae_core::kernels::matmul_xt;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let get = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (n, d_in, d_sae, reps) = (get(0, 4096), get(1, 576), get(2, 9216), get(3, 7));
    let x: Vec<f32> = (0..n * d_in)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let w_t: Vec<f32> = (0..d_sae * d_in)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 300.0)
        .collect();
    let mut out = vec![0.0f32; n * d_sae];
    let mut packed = PackedBf16::pack_transposed(&w_t, d_in, d_sae);
    let paths = Bf16Path::all_available();
    let (mut t_f32, mut t_pack) = (Vec::new(), Vec::new());
    let mut t_path = vec![Vec::new(); paths.len()];
    let mut scratch = sae_core::aligned::AlignedVec::default();
    // Interleaved, so that all see the same machine load.
    for _ in 0..reps {
        let t = Instant::now();
        matmul_xt(&x, n, d_in, &w_t, d_sae, &mut out);
        t_f32.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        packed.repack_transposed(&w_t);
        t_pack.push(t.elapsed().as_secs_f64());
        for (p, times) in paths.iter().zip(&mut t_path) {
            let t = Instant::now();
            matmul_on(
                *p,
                n,
                &x,
                d_in,
                &packed,
                &mut out,
                d_sae,
                false,
                &mut scratch,
            );
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let gflops = |s: f64| 2.0 * (n * d_in * d_sae) as f64 / s / 1e9;
    println!(
        "{n} x {d_in} x {d_sae}, {} threads, median of {reps}",
        rayon::current_num_threads()
    );
    let f = median(t_f32);
    println!(
        "f32 gemm            {:8.1} ms  {:6.1} GFLOP/s",
        1e3 * f,
        gflops(f)
    );
    for (p, times) in paths.iter().zip(t_path) {
        let m = median(times);
        println!(
            "bf16 {:<14} {:8.1} ms  {:6.1} GFLOP/s",
            p.name(),
            1e3 * m,
            gflops(m)
        );
    }
    println!("pack W_enc to bf16  {:8.1} ms", 1e3 * median(t_pack));
    Ok(())
}
