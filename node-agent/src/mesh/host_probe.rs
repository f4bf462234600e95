//! The host probe SNAT (Istio's `cni/pkg/iptables` host rules) over native nf_tables: kubelet's
//! probes to enrolled pods leave the host from the probe SNAT address, which the
//! in-pod rules accept unredirected.

use std::net::IpAddr;
use std::path::Path;

use iptables_rules::config::HostProbeConfig;
use iptables_rules::nft::host::NftHostProbe;
use tracing::info;

use super::hooks::ProbeSet;

/// The nft host table `inet istio-ambient-nat` with the probe sets, entries keyed by pod UID.
#[derive(Debug)]
pub struct NftProbeSet {
    inner: NftHostProbe,
}

impl NftProbeSet {
    /// Installs the host rule (kept across agent restarts and upgrades) and returns the set handle.
    pub fn install(cfg: &HostProbeConfig) -> Result<Self, String> {
        let inner = NftHostProbe;
        inner
            .apply(cfg)
            .map_err(|e| format!("host probe rules: {e}"))?;
        info!(kubelet_uid = ?cfg.kubelet_uid, "host probe SNAT installed");
        Ok(Self { inner })
    }
}

impl ProbeSet for NftProbeSet {
    fn upsert(&self, uid: &str, ips: &[IpAddr]) -> Result<(), String> {
        self.inner.upsert(uid, ips).map_err(|e| e.to_string())
    }

    fn remove(&self, uid: &str) -> Result<(), String> {
        self.inner
            .remove_uid(uid)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn resync(&self, held: &[(String, Vec<IpAddr>)]) -> Result<(), String> {
        for (uid, ips) in held {
            self.upsert(uid, ips)?;
        }
        let keep: Vec<IpAddr> = held
            .iter()
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect();
        let pruned = self.inner.prune_except(&keep).map_err(|e| e.to_string())?;
        if !pruned.is_empty() {
            info!(?pruned, "pruned probe-set entries of pods no longer held");
        }
        Ok(())
    }

    fn uninstall(&self) -> Result<(), String> {
        // The same removal as `ambient-cni-agent uninstall`.
        self.inner.remove().map_err(|e| e.to_string())
    }
}

/// The kubelet's uid, found as Istio does: a process whose `comm` is `kubelet`
/// or `kubelite` (with "kubelet" in its argv) or `k3s`.
pub fn kubelet_uid(host_proc: &Path) -> Option<u32> {
    let rd = std::fs::read_dir(host_proc).ok()?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = host_proc.join(pid);
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        let argv_ok = || {
            std::fs::read(dir.join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("kubelet"))
                .unwrap_or(false)
        };
        let is_kubelet = match comm {
            "kubelet" | "kubelite" => argv_ok(),
            "k3s" => true,
            _ => false,
        };
        if !is_kubelet {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|u| u.parse().ok());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kubelet_in_a_proc_tree() {
        let root = std::env::temp_dir().join(format!("acni-proc-{}", std::process::id()));
        let mk = |pid: &str, comm: &str, cmdline: &str, uid: u32| {
            let d = root.join(pid);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(d.join("cmdline"), cmdline.replace(' ', "\0")).unwrap();
            std::fs::write(
                d.join("status"),
                format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .unwrap();
        };
        mk("10", "bash", "bash -c kubelet", 5);
        mk("11", "kubelet", "/usr/bin/other", 6);
        assert_eq!(
            kubelet_uid(&root),
            None,
            "comm and argv must both say kubelet"
        );
        mk("12", "kubelet", "/usr/bin/kubelet --config x", 1000);
        assert_eq!(kubelet_uid(&root), Some(1000));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
