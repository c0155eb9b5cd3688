//! `candela serve`.

/// Arguments of `candela serve`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `candela serve`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("candela serve is not built yet")
}
