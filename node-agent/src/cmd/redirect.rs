//! `ambient-cni-agent redirect` (placeholder until the rules crate lands; owned by the rules work).

/// Flags of `redirect`.
#[derive(Debug, clap::Args)]
pub struct RedirectArgs {}

/// Runs `redirect`.
pub fn run(_args: RedirectArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
