//! Least privilege: the agent keeps only the capabilities it uses.

use caps::{CapSet, Capability, CapsHashSet};
use tracing::info;

/// What the agent needs: netns entry (SYS_ADMIN), rules and routes (NET_ADMIN,
/// NET_RAW), reading other processes' /proc entries (SYS_PTRACE), and the host's
/// root-owned CNI files and sockets (DAC_OVERRIDE).
pub const KEEP: [Capability; 5] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_OVERRIDE,
];

/// Sets `no_new_privs` (nothing the agent execs, e.g. iptables, can gain privileges
/// through setuid bits or file capabilities), then drops every other capability from
/// the bounding, inheritable, effective and permitted sets, and logs the result.
pub fn drop_unneeded() -> anyhow::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        anyhow::bail!("set no_new_privs: {}", std::io::Error::last_os_error());
    }
    let keep: CapsHashSet = KEEP.into_iter().collect();
    let have = caps::read(None, CapSet::Permitted)
        .map_err(|e| anyhow::anyhow!("read capabilities: {e}"))?;
    // The bounding set needs CAP_SETPCAP, so trim it while we still have that.
    for cap in caps::all() {
        if !keep.contains(&cap) && have.contains(&Capability::CAP_SETPCAP) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    let kept: CapsHashSet = have.intersection(&keep).copied().collect();
    let sets = [
        (CapSet::Inheritable, CapsHashSet::new()),
        (CapSet::Effective, kept.clone()),
        (CapSet::Permitted, kept.clone()),
    ];
    for (set, target) in sets {
        caps::set(None, set, &target)
            .map_err(|e| anyhow::anyhow!("set {set:?} capabilities: {e}"))?;
    }
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    info!(capabilities = %names.join(","), "dropped all other capabilities");
    Ok(())
}
