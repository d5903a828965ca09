//! Subcommands owned by: sae-browser owner.

use clap::Args;

#[derive(Args)]
pub struct AnalyzeArgs {}

pub fn analyze(_args: AnalyzeArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae analyze' is not implemented yet")
}

#[derive(Args)]
pub struct ServeArgs {}

pub fn serve(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae serve' is not implemented yet")
}
