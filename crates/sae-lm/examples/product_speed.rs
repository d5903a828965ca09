//! GFLOP/s of the forward pass's weight products on SmolLM2-135M shapes (2032 rows: 16
//! contexts of 127), f32 through `gemm` and bf16 through `sae_lm::bf16`:
//! `cargo run --release -p sae-lm --example product_speed [REPEATS]`.

use std::time::Instant;

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS is a count"))
        .unwrap_or(10);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // (rows, k, n): q|k|v, o, gate|up, down.
    let m = 2032;
    for (name, k, n) in [
        ("qkv", 576, 960),
        ("o", 576, 576),
        ("gate_up", 576, 3072),
        ("down", 1536, 576),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let mut out = vec![0f32; m * n];
        let flop = 2.0 * (m * k * n) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let start = Instant::now();
            for _ in 0..repeats {
                f();
            }
            flop * repeats as f64 / start.elapsed().as_secs_f64() / 1e9
        };
        let f32_rate = time(&mut || unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        });
        let bf16_rate = if sae_lm::bf16::available() {
            let packed = sae_lm::bf16::PackedBf16::pack(&w, k, n);
            let mut scratch = Vec::new();
            let rate = time(&mut || {
                sae_lm::bf16::matmul(m, &a, k, &packed, &mut out, n, false, &mut scratch)
            });
            format!("{rate:.0}")
        } else {
            "n/a (no AVX512-BF16)".into()
        };
        println!(
            "{name:8} {m}x{k}x{n}, {threads} threads: f32 gemm {f32_rate:.0} GFLOP/s, bf16 {bf16_rate} GFLOP/s"
        );
    }
}
