//! Subcommands owned by: sae-train owner.

use clap::Args;

#[derive(Args)]
pub struct TrainArgs {}

pub fn train(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae train' is not implemented yet")
}

#[derive(Args)]
pub struct InfoArgs {}

pub fn info(_args: InfoArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae info' is not implemented yet")
}

#[derive(Args)]
pub struct SynthArgs {}

pub fn synth(_args: SynthArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae synth' is not implemented yet")
}

#[derive(Args)]
pub struct BenchArgs {}

pub fn bench(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae bench' is not implemented yet")
}
