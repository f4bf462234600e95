//! Helpers for tests and benches that compare against what the kernel prints back.
//! They run the system tools in the current thread's netns.

use crate::error::RulesError;
use crate::exec;
use crate::normalize;

/// Loads nft transaction text (`nft -f -`) into the current netns and returns the
/// normalized `nft list ruleset`.
pub fn nft_load_and_list(text: &str) -> Result<String, RulesError> {
    exec::run("nft", "nft", &["-f", "-"], Some(text.as_bytes()))?;
    nft_list()
}

/// The current netns's normalized `nft list ruleset`.
pub fn nft_list() -> Result<String, RulesError> {
    Ok(normalize::nft_list(&exec::run(
        "nft",
        "nft",
        &["list", "ruleset"],
        None,
    )?))
}

/// Whole `<save_bin>` output (e.g. `iptables-nft-save`) without comments/counters.
pub fn iptables_save_all(save_bin: &str) -> Result<String, RulesError> {
    Ok(normalize::iptables_save_all(&exec::run(
        save_bin,
        save_bin,
        &[],
        None,
    )?))
}
