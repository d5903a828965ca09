//! GFLOP/s of the forward pass's weight products on SmolLM2-135M shapes (2032 rows: 16
//! contexts of 127), and of a training step's encoder product (4096 x 576 x 9216): f32 on
//! every path this CPU runs (`sae_core::f32_product`), bf16 and bf16x3 (three-term, split
//! operands) on every path (`sae_lm::bf16`: AMX, AVX512-BF16, widened), alternated over
//! rounds; medians (bf16x3 counted as the f32 product's flops), and each path's median ratio
//! to `gemm` within a round. The last column is the bf16 product on input already rounded
//! (as the forward's norms and SwiGLU write it), the comparison for a library timed on bf16
//! input:
//! `cargo run --release -p sae-lm --example product_speed [ROUNDS]`.

use sae_core::f32_product::{self, F32Path, PackedF32};
use sae_lm::bf16::Bf16Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROUNDS is a count"))
        .unwrap_or(5);
    let threads = rayon::current_num_threads();
    // (name, rows, k, n): q|k|v, o, gate|up, down, and the SAE encoder.
    for (name, m, k, n) in [
        ("qkv", 2032, 576, 960),
        ("o", 2032, 576, 576),
        ("gate_up", 2032, 576, 3072),
        ("down", 2032, 1536, 576),
        ("encoder", 4096, 576, 9216),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let mut out = sae_core::aligned::AlignedVec::<f32>::zeroed(m * n);
        let flop = 2.0 * (m * k * n) as f64;
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            f(&mut out);
            let start = Instant::now();
            for _ in 0..3 {
                f(&mut out);
            }
            flop * 3.0 / start.elapsed().as_secs_f64() / 1e9
        };
        let f32_paths: Vec<(F32Path, PackedF32)> = F32Path::all_available()
            .into_iter()
            .map(|p| (p, PackedF32::pack_for(p, &w, k, n)))
            .collect();
        let packs = [
            ("bf16", sae_lm::bf16::PackedBf16::pack(&w, k, n)),
            ("bf16x3", sae_lm::bf16::PackedBf16::pack_split(&w, k, n)),
        ];
        let mut scratch = sae_core::aligned::AlignedVec::default();
        let bf16_paths: Vec<(&str, &sae_lm::bf16::PackedBf16, Bf16Path)> = packs
            .iter()
            .flat_map(|(kind, p)| {
                Bf16Path::all_available()
                    .into_iter()
                    .map(move |b| (*kind, p, b))
            })
            .collect();
        // The forward's q|k|v, gate|up and down read rows that the norm or the SwiGLU already
        // wrote in bf16: the product alone, without the rounding, as oneDNN's bf16 matmul is
        // timed on bf16 input (`tools/bench_libs.sh`).
        let pairs_path = sae_lm::bf16::available().then(|| {
            let mut pairs = sae_core::aligned::AlignedVec::default();
            sae_lm::bf16::round_rows(m, &a, k, k, &mut pairs);
            pairs
        });
        let all = f32_paths.len() + bf16_paths.len() + pairs_path.is_some() as usize;
        let mut rates = vec![Vec::new(); all];
        let mut ratios = vec![Vec::new(); all];
        for _ in 0..rounds {
            for (i, (_, packed)) in f32_paths.iter().enumerate() {
                rates[i].push(time(&mut |out| {
                    f32_product::matmul(m, &a, k, packed, out, n, false)
                }));
            }
            for (i, &(_, packed, path)) in bf16_paths.iter().enumerate() {
                rates[f32_paths.len() + i].push(time(&mut |out| {
                    sae_lm::bf16::matmul_on(path, m, &a, k, packed, out, n, false, &mut scratch)
                }));
            }
            if let Some(pairs) = &pairs_path {
                rates[all - 1].push(time(&mut |out| {
                    sae_lm::bf16::matmul_pairs(m, pairs, &packs[0].1, out, n, false)
                }));
            }
            for i in 0..all {
                let r = rates[i].last().unwrap() / rates[0].last().unwrap();
                ratios[i].push(r);
            }
        }
        let mut line = format!("{name:8} {m}x{k}x{n}, {threads} threads:");
        let names = f32_paths
            .iter()
            .map(|(p, _)| format!("f32 {}", p.name()))
            .chain(
                bf16_paths
                    .iter()
                    .map(|(kind, _, p)| format!("{kind} {}", p.name())),
            )
            .chain(pairs_path.iter().map(|_| {
                format!(
                    "bf16 on bf16 input {}",
                    sae_lm::bf16::Bf16Path::best_on_pairs().name()
                )
            }));
        for (i, label) in names.enumerate() {
            let (rate, ratio) = (median(rates[i].clone()), median(ratios[i].clone()));
            line += &format!(" {label} {rate:.0} GFLOP/s ({ratio:.2}x gemm);");
        }
        println!("{}", line.trim_end_matches(';'));
    }
}
