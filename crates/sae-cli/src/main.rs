//! `sae`: the single binary. Each subcommand lives in its own module; the work itself lives
//! in the library crates, which follow the data flow:
//! corpus -> tokenizer -> model (sae-lm) -> activation store (sae-store) -> trainer
//! (sae-core, sae-train) -> SAE files -> evaluation (sae-eval) -> feature browser (sae-browser).

mod browse;
mod evaluate;
mod harvest;
mod synthbench;
mod train;

use clap::{Parser, Subcommand};

/// Large buffers on 2 MiB pages: the sparse passes gather rows at random from them.
#[global_allocator]
static ALLOC: sae_core::hugepage::HugePageAlloc = sae_core::hugepage::HugePageAlloc;

#[derive(Parser)]
#[command(
    name = "sae",
    version,
    about = "Sparse dictionary learning on language-model activations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an SAE on stored activations (or straight from a model).
    Train(Box<train::TrainArgs>),
    /// Print what is in an SAE directory, an activation store, or a folder of them (one per hook).
    Info(train::InfoArgs),
    /// Write a synthetic activation set with known ground-truth features.
    Synth(train::SynthArgs),
    /// Benchmark training steps against the one-GEMM limit.
    Bench(train::BenchArgs),
    /// List the SAE families: names, SAELens names, sparsity, defaults and options.
    Archs,
    /// Run a language model over a corpus and store activations at a hook point.
    Harvest(harvest::HarvestArgs),
    /// List a model's hook points with their widths.
    Hooks(harvest::HooksArgs),
    /// Evaluate an SAE: reconstruction metrics and spliced LM loss.
    Eval(evaluate::EvalArgs),
    /// Train and evaluate a grid of SAEs and plot the Pareto curves.
    Sweep(evaluate::SweepArgs),
    /// The whole pipeline on the embedded default: harvest, gated-vs-relu sweep, report.
    Demo(evaluate::DemoArgs),
    /// Scan text with an SAE and store per-latent statistics for the browser.
    Analyze(browse::AnalyzeArgs),
    /// Serve the feature browser for an analysis directory.
    Serve(browse::ServeArgs),
    /// Train SAEs on the SynthSAEBench generator and score them against its true features.
    Synthbench(synthbench::SynthBenchArgs),
}

fn main() {
    // Before the options are read: `--help` prints too.
    sigpipe_ends_the_command(true);
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        sigpipe_ends_the_command(false);
    }
    let result = match cli.command {
        Command::Train(a) => train::train(*a),
        Command::Info(a) => train::info(a),
        Command::Synth(a) => train::synth(a),
        Command::Bench(a) => train::bench(a),
        Command::Archs => {
            train::archs();
            Ok(())
        }
        Command::Harvest(a) => harvest::harvest(a),
        Command::Hooks(a) => harvest::hooks(a),
        Command::Eval(a) => evaluate::eval(a),
        Command::Sweep(a) => evaluate::sweep(a),
        Command::Demo(a) => evaluate::demo(a),
        Command::Analyze(a) => browse::analyze(a),
        Command::Serve(a) => browse::serve(a),
        Command::Synthbench(a) => synthbench::synthbench(a),
    };
    if let Err(e) = result {
        // One clear line (with its causes) and a non-zero exit; never a panic trace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// With `ends`, output piped into `head` (or anything that stops reading) ends the command
/// quietly, as it ends a Unix tool, instead of a panic in `println!` on the broken pipe.
/// Without, SIGPIPE is ignored (Rust's default): for the server, whose sockets a browser may
/// close at any time.
fn sigpipe_ends_the_command(ends: bool) {
    // SAFETY: sets SIGPIPE's action to the default or to ignore, before any other thread
    // exists; no handler runs.
    #[cfg(unix)]
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            if ends { libc::SIG_DFL } else { libc::SIG_IGN },
        );
    }
}
