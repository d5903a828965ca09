//! Subcommands owned by: sae-lm owner.

use clap::Args;

#[derive(Args)]
pub struct HarvestArgs {}

pub fn harvest(_args: HarvestArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae harvest' is not implemented yet")
}

#[derive(Args)]
pub struct HooksArgs {}

pub fn hooks(_args: HooksArgs) -> anyhow::Result<()> {
    anyhow::bail!("'sae hooks' is not implemented yet")
}
