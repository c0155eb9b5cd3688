//! `candela generate`.

/// Arguments of `candela generate`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `candela generate`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("candela generate is not built yet")
}
