//! The host probe SNAT (Istio's `cni/pkg/iptables` host rules) over native nf_tables: kubelet's
//! probes to enrolled pods leave the host from the probe SNAT address, which the
//! in-pod rules accept unredirected.

use std::net::IpAddr;
use std::path::Path;

use std::sync::Mutex;

use iptables_rules::config::HostProbeConfig;
use iptables_rules::drift::{compare_probe, Finding};
use iptables_rules::nft::host::NftHostProbe;
use iptables_rules::nft::NftSocket;
use tracing::info;

use super::hooks::ProbeSet;

/// The nft host table `inet istio-ambient-nat` with the probe sets, entries keyed by pod UID.
#[derive(Debug)]
pub struct NftProbeSet {
    inner: NftHostProbe,
    /// One host nf_tables socket for every ADD's upsert, kept open: closing one (even on the
    /// background reaper) flushes nf_tables' deferred destruction and waits for an RCU grace
    /// period under the host netns' commit lock, which the next ADD's upsert then waited
    /// for (a p50 of 7-8 ms in `kube_add`). Reopened after an error.
    sock: Mutex<Option<NftSocket>>,
}

impl NftProbeSet {
    /// Installs the host rule (kept across agent restarts and upgrades) and returns the set handle.
    pub fn install(cfg: &HostProbeConfig) -> Result<Self, String> {
        let inner = NftHostProbe;
        inner
            .apply(cfg)
            .map_err(|e| format!("host probe rules: {e}"))?;
        info!(kubelet_uid = ?cfg.kubelet_uid, "host probe SNAT installed");
        Ok(Self {
            inner,
            sock: Mutex::new(None),
        })
    }
}

impl ProbeSet for NftProbeSet {
    fn upsert(&self, uid: &str, ips: &[IpAddr]) -> Result<(), String> {
        let mut guard = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let sock = match guard.as_mut() {
            Some(s) => s,
            // The agent's threads are in the host netns: so is this socket.
            None => guard.insert(NftSocket::open().map_err(|e| format!("host probe set: {e}"))?),
        };
        let res = sock.commit(NftHostProbe::upsert_batch(uid, ips));
        if res.is_err() {
            // A socket in an unknown state is not reused.
            *guard = None;
        }
        res.map_err(|e| format!("host probe set: upsert of pod {uid}: {e}"))
    }

    fn remove(&self, uid: &str) -> Result<(), String> {
        self.inner
            .remove_uid(uid)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn resync(&self, held: &[(String, Vec<IpAddr>)]) -> Result<(), String> {
        self.inner.upsert_all(held).map_err(|e| e.to_string())?;
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

    fn check(&self, uid: &str, ips: &[IpAddr]) -> Result<Vec<Finding>, String> {
        let entries = self.inner.lookup(ips).map_err(|e| e.to_string())?;
        Ok(compare_probe(&entries, uid, ips))
    }

    fn uninstall(&self) -> Result<(), String> {
        // The same removal as `ambient-cni-agent uninstall`.
        self.inner.remove().map_err(|e| e.to_string())
    }
}

/// The kubelet's uid, found as Istio does: a process whose `comm` is `kubelet`
/// or `kubelite` (with "kubelet" in its argv) or `k3s`. The host /proc also lists
/// pod processes, which may call themselves anything: a process in a pod's cgroup
/// or in another mount namespace than the host's PID 1 is never taken for the
/// kubelet. Unreadable entries are skipped, never the end of the scan.
pub fn kubelet_uid(host_proc: &Path) -> Option<u32> {
    let host_mnt = std::fs::read_link(host_proc.join("1/ns/mnt")).ok();
    let rd = std::fs::read_dir(host_proc).ok()?;
    let mut pids: Vec<u64> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // Lowest pid first: deterministic, and the node's kubelet predates pods.
    pids.sort_unstable();
    pids.into_iter()
        .find_map(|pid| kubelet_process_uid(&host_proc.join(pid.to_string()), host_mnt.as_deref()))
}

/// The uid of the process at `dir` if it is the host's kubelet.
fn kubelet_process_uid(dir: &Path, host_mnt: Option<&Path>) -> Option<u32> {
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let is_kubelet = match comm.trim() {
        "kubelet" | "kubelite" => std::fs::read(dir.join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("kubelet")),
        "k3s" => true,
        _ => false,
    };
    if !is_kubelet {
        return None;
    }
    if let Ok(cg) = std::fs::read_to_string(dir.join("cgroup")) {
        if !matches!(crate::discovery::cgroup::pod_uid(&cg), Ok(None)) {
            info!(process = %dir.display(), "a process named like the kubelet runs in a pod: ignored");
            return None;
        }
    }
    if let Some(host) = host_mnt {
        if std::fs::read_link(dir.join("ns/mnt")).ok().as_deref() != Some(host) {
            info!(process = %dir.display(), "a process named like the kubelet runs in another mount namespace: ignored");
            return None;
        }
    }
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc entry: comm, cmdline, status, cgroup, and ns/mnt as a symlink.
    struct Proc<'a> {
        comm: &'a str,
        cmdline: &'a str,
        uid: Option<u32>,
        cgroup: &'a str,
        mnt: &'a str,
    }

    const HOST_CG: &str = "0::/system.slice/kubelet.service\n";
    const POD_CG: &str =
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b8c11aa_2b1c_4d3e_8f9a_0123456789ab.slice/cri-containerd-1.scope\n";

    fn mk(root: &Path, pid: u32, p: &Proc<'_>) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(d.join("ns")).unwrap();
        std::fs::write(d.join("comm"), format!("{}\n", p.comm)).unwrap();
        std::fs::write(d.join("cmdline"), p.cmdline.replace(' ', "\0")).unwrap();
        std::fs::write(d.join("cgroup"), p.cgroup).unwrap();
        std::os::unix::fs::symlink(p.mnt, d.join("ns/mnt")).unwrap();
        match p.uid {
            Some(uid) => std::fs::write(
                d.join("status"),
                format!("Name:\t{}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n", p.comm),
            )
            .unwrap(),
            // A status that cannot be read as a file.
            None => std::fs::create_dir(d.join("status")).unwrap(),
        }
    }

    fn tree(tag: &str) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("acni-proc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        mk(
            &root,
            1,
            &Proc {
                comm: "systemd",
                cmdline: "/sbin/init",
                uid: Some(0),
                cgroup: "0::/init.scope\n",
                mnt: "mnt:[4026531841]",
            },
        );
        root
    }

    #[test]
    fn finds_kubelet_in_a_proc_tree() {
        let root = tree("a");
        let host = |comm, cmdline, uid| Proc {
            comm,
            cmdline,
            uid: Some(uid),
            cgroup: HOST_CG,
            mnt: "mnt:[4026531841]",
        };
        mk(&root, 10, &host("bash", "bash -c kubelet", 5));
        mk(&root, 11, &host("kubelet", "/usr/bin/other", 6));
        assert_eq!(
            kubelet_uid(&root),
            None,
            "comm and argv must both say kubelet"
        );
        mk(
            &root,
            12,
            &host("kubelet", "/usr/bin/kubelet --config x", 1000),
        );
        assert_eq!(kubelet_uid(&root), Some(1000));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Pod processes named `kubelet`/`k3s` (in a pod cgroup, or in their own mount
    /// namespace) and an unreadable status come first in pid order: none of them ends
    /// the scan or lends its uid; the host's kubelet is found after them.
    #[test]
    fn impostors_and_unreadable_entries_are_skipped() {
        let root = tree("b");
        let kubelet = "/usr/bin/kubelet --config x";
        let cases = [
            (20, "kubelet", POD_CG, "mnt:[4026531841]", Some(65534)),
            (21, "k3s", HOST_CG, "mnt:[4026532999]", Some(65533)),
            (22, "kubelet", HOST_CG, "mnt:[4026531841]", None),
            (30, "kubelet", HOST_CG, "mnt:[4026531841]", Some(0)),
        ];
        for (pid, comm, cgroup, mnt, uid) in cases {
            mk(
                &root,
                pid,
                &Proc {
                    comm,
                    cmdline: kubelet,
                    uid,
                    cgroup,
                    mnt,
                },
            );
        }
        assert_eq!(kubelet_uid(&root), Some(0));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
