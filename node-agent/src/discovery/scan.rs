//! Finding enrolled pods' netns by scanning `/proc` (restart reconciliation,
//! Istio's `cni/pkg/nodeagent/podcgroupns.go`): cgroup → pod UID, then proof of ownership by the pod's IP.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use iptables_rules::netns::{Netns, NetnsError, NsId};
use tracing::{debug, info, warn};

use super::cgroup;
use super::procfs;

/// Most of a cgroup file we read (real ones are well under 4 KiB).
const MAX_CGROUP_FILE: u64 = 64 * 1024;

/// One process's view that may be a pod's netns.
struct Seen {
    id: NsId,
    starttime: u64,
    pid: u32,
}

/// For each wanted pod UID (with its IPs), the netns its processes live in.
///
/// Skips the host netns (`host`), pods with no IP, and netns that hold none of
/// the pod's IPs; among several netns for one pod the one holding its oldest
/// process wins; a netns is given to at most one pod. Per-process errors
/// (processes vanish mid-scan) are logged and skipped. Blocking (enters netns
/// on helper threads): call from a blocking context.
pub fn scan_for_pods(
    host_proc: &Path,
    wanted: &HashMap<String, Vec<IpAddr>>,
    host: NsId,
) -> HashMap<String, Netns> {
    let wanted: HashMap<&str, &[IpAddr]> = wanted
        .iter()
        .filter(|(_, ips)| !ips.is_empty())
        .map(|(u, ips)| (u.as_str(), ips.as_slice()))
        .collect();
    if wanted.is_empty() {
        return HashMap::new();
    }
    let candidates = collect(host_proc, &wanted, host);
    let found = choose(candidates, |uid, ns: &Netns| {
        let ips = wanted.get(uid).copied().unwrap_or_default();
        match netns_holds_any(ns, ips) {
            Ok(true) => true,
            Ok(false) => {
                info!(
                    uid,
                    netns = ns.label(),
                    "pod cgroup in a netns without the pod's IP, skipped"
                );
                false
            }
            Err(e) => {
                warn!(uid, "cannot check addresses: {e}");
                false
            }
        }
    });
    for (uid, ns) in &found {
        info!(uid, netns = ns.label(), id = %ns.id(), "found pod netns by /proc scan");
    }
    found
}

/// Candidate netns per wanted UID, each opened (pinned) and with the start time
/// of its oldest process.
fn collect(
    host_proc: &Path,
    wanted: &HashMap<&str, &[IpAddr]>,
    host: NsId,
) -> HashMap<String, Vec<(u64, NsId, Netns)>> {
    let mut out: HashMap<String, Vec<(u64, NsId, Netns)>> = HashMap::new();
    let entries = match std::fs::read_dir(host_proc) {
        Ok(e) => e,
        Err(e) => {
            warn!(path = %host_proc.display(), "cannot list processes: {e}");
            return out;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| procfs::is_pid(n)) else {
            continue;
        };
        let dir = host_proc.join(name);
        let seen = match inspect(&dir, name, wanted, host) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                debug!(pid = name, "skipped: {e}");
                continue;
            }
        };
        let (uid, s) = seen;
        let list = out.entry(uid.clone()).or_default();
        if let Some(c) = list.iter_mut().find(|c| c.1 == s.id) {
            c.0 = c.0.min(s.starttime);
            continue;
        }
        // Open now: pins the netns and proves the pid still has the one we stat'ed.
        match Netns::open(&dir.join("ns/net"), Some(host)) {
            Ok(ns) if ns.id() == s.id => list.push((s.starttime, s.id, ns)),
            Ok(_) => debug!(pid = s.pid, "netns changed under us (pid reused), skipped"),
            Err(e) => debug!(pid = s.pid, "{e}"),
        }
    }
    out
}

/// Looks at one `/proc/<pid>`: `Ok(None)` if not a wanted pod's process.
fn inspect(
    dir: &Path,
    pid: &str,
    wanted: &HashMap<&str, &[IpAddr]>,
    host: NsId,
) -> Result<Option<(String, Seen)>, String> {
    let netns_path = dir.join("ns/net");
    let md =
        std::fs::metadata(&netns_path).map_err(|e| format!("{}: {e}", netns_path.display()))?;
    let id = NsId {
        dev: md.dev(),
        ino: md.ino(),
    };
    if id == host {
        return Ok(None);
    }
    let text = read_capped(&dir.join("cgroup"))?;
    let uid = match cgroup::pod_uid(&text) {
        Ok(Some(uid)) => uid,
        Ok(None) => return Ok(None),
        Err(e) => {
            warn!(pid, "cannot attribute process to a pod: {e}");
            return Ok(None);
        }
    };
    if !wanted.contains_key(uid.as_str()) {
        return Ok(None);
    }
    let stat = read_capped(&dir.join("stat"))?;
    let starttime = procfs::starttime(&stat).ok_or_else(|| format!("{pid}: unparsable stat"))?;
    let pid = pid.parse().map_err(|_| format!("{pid}: not a pid"))?;
    Ok(Some((uid, Seen { id, starttime, pid })))
}

fn read_capped(path: &Path) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut s = String::new();
    f.take(MAX_CGROUP_FILE)
        .read_to_string(&mut s)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(s)
}

/// Picks, per UID, the verified candidate whose oldest process started first;
/// a netns already given to one UID is not given to another. Pure apart from `verify`.
fn choose<T>(
    candidates: HashMap<String, Vec<(u64, NsId, T)>>,
    mut verify: impl FnMut(&str, &T) -> bool,
) -> HashMap<String, T> {
    let mut claimed: HashSet<NsId> = HashSet::new();
    let mut out = HashMap::new();
    // Deterministic order: UIDs sorted, candidates oldest first.
    let mut uids: Vec<_> = candidates.into_iter().collect();
    uids.sort_by(|a, b| a.0.cmp(&b.0));
    for (uid, mut list) in uids {
        list.sort_by_key(|c| c.0);
        for (_, id, item) in list {
            if claimed.contains(&id) {
                continue;
            }
            if verify(&uid, &item) {
                claimed.insert(id);
                out.insert(uid, item);
                break;
            }
        }
    }
    out
}

/// Whether any interface in the netns carries one of `ips`.
pub fn netns_holds_any(ns: &Netns, ips: &[IpAddr]) -> Result<bool, NetnsError> {
    let addrs = ns.run(local_addresses)?.map_err(|e| NetnsError::Thread {
        label: ns.label().to_owned(),
        reason: format!("getifaddrs: {e}"),
    })?;
    Ok(addrs.iter().any(|a| ips.contains(a)))
}

/// Addresses of every interface in the calling thread's netns.
fn local_addresses() -> Result<Vec<IpAddr>, nix::Error> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> NsId {
        NsId { dev: 4, ino }
    }

    #[test]
    fn oldest_verified_wins_regardless_of_listing_order() {
        let mut c = HashMap::new();
        c.insert(
            "a".to_owned(),
            vec![
                (300, id(3), "young"),
                (100, id(1), "old"),
                (200, id(2), "mid"),
            ],
        );
        let got = choose(c, |_, _| true);
        assert_eq!(got["a"], "old");
    }

    #[test]
    fn unverified_candidates_fall_through_and_claims_are_exclusive() {
        let mut c = HashMap::new();
        c.insert(
            "a".to_owned(),
            vec![(100, id(1), "a-wrong-ip"), (200, id(2), "a-ok")],
        );
        // "b" also maps to netns 2 (already claimed by "a"), and to netns 9 with the wrong IP.
        c.insert(
            "b".to_owned(),
            vec![(50, id(2), "b-shared"), (60, id(9), "b-wrong")],
        );
        let got = choose(c, |_, item| !item.contains("wrong"));
        assert_eq!(got.get("a"), Some(&"a-ok"));
        assert_eq!(got.get("b"), None);
    }

    #[test]
    fn own_netns_lists_loopback() {
        let addrs = local_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}
