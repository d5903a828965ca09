//! Subcommands owned by: sae-eval owner.

use clap::Args;

#[derive(Args)]
pub struct EvalArgs {}

pub fn eval(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae eval' is not implemented yet")
}

#[derive(Args)]
pub struct SweepArgs {}

pub fn sweep(_args: SweepArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae sweep' is not implemented yet")
}

#[derive(Args)]
pub struct DemoArgs {}

pub fn demo(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae demo' is not implemented yet")
}
