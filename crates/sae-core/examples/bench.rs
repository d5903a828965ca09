//! `cargo run --release -p sae-core --example bench [arch,...] [steps]`
use sae_core::bench::{run_bench, BenchRow, BENCH_L0};
use sae_core::ArchKind;

/// As the `sae` binary: large buffers on huge pages, so both bench the same step.
#[global_allocator]
static ALLOC: sae_core::hugepage::HugePageAlloc = sae_core::hugepage::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let archs: Vec<ArchKind> = match args.get(1) {
        Some(s) => s
            .split(',')
            .map(|a| a.parse::<ArchKind>())
            .collect::<Result<_, _>>()?,
        None => ArchKind::all().collect(),
    };
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let sizes: Vec<usize> = match args.get(3) {
        Some(s) => s.split(',').map(|v| v.parse()).collect::<Result<_, _>>()?,
        None => vec![4608, 9216],
    };
    println!("threads: {}", rayon::current_num_threads());
    println!("{}", BenchRow::header());
    for row in run_bench(&archs, &sizes, 576, 4096, steps, BENCH_L0) {
        println!("{row}");
    }
    Ok(())
}
