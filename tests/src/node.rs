//! The real kubelet node of `../shared/peers/node.sh` for the lifecycle suite: its variables,
//! the host facts a test reads there (the CNI conflist and bin dir, pod netns by IP, a pod's
//! processes by its cgroup, host nftables), and the tools run with fixed arguments
//! (`ctr` on the node's containerd, `helm`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::peers::skip;

/// containerd's socket on the node (`node.sh`).
pub const CONTAINERD_SOCK: &str = "/run/k8s-local/containerd/containerd.sock";
/// The node's primary CNI config: bridge + host-local + portmap.
pub const NODE_CONFLIST: &str = "/etc/cni/net.d/10-k8s-local-bridge.conflist";
/// The node's CNI bin dir.
pub const NODE_CNI_BIN: &str = "/opt/cni/bin";
/// Where containerd pins pod netns (the chart's `cniNetnsDir`).
pub const NETNS_DIR: &str = "/var/run/netns";
/// The node's local busybox image (has `httpd`, `netstat`, `wget`).
pub const BUSYBOX_IMAGE: &str = "localhost/k8s-local/busybox:1.35";

/// What the lifecycle suite needs from the environment.
#[derive(Debug, Clone)]
pub struct NodePeer {
    /// Admin kubeconfig of the running `node.sh start --node` (`NODE_KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// The real helm CLI (`HELM_BIN`, printed by `helm.sh`).
    pub helm: PathBuf,
    /// Our image as `scripts/image.sh` writes it (`AMBIENT_CNI_IMAGE_TAR`).
    pub image_tar: PathBuf,
    /// Stock ztunnel (`ZTUNNEL_BIN`).
    pub ztunnel: PathBuf,
}

/// The node's variables when all are set (and root); else skips (`None`) or fails under `CI`.
pub fn node_peer(test: &str) -> Option<NodePeer> {
    if !crate::require_root(test) {
        return None;
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let names = [
        "NODE_KUBECONFIG",
        "HELM_BIN",
        "AMBIENT_CNI_IMAGE_TAR",
        "ZTUNNEL_BIN",
    ];
    let vals: Vec<Option<PathBuf>> = names.iter().map(|k| var(k)).collect();
    let missing: Vec<&str> = names
        .iter()
        .zip(&vals)
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        skip(
            test,
            &format!(
                "{} unset (`node.sh start --node` prints the kubeconfig, `helm.sh` HELM_BIN, \
                 `scripts/image.sh OUT.tar` builds the image)",
                missing.join(", ")
            ),
        );
        return None;
    }
    let [k, h, i, z] = [0, 1, 2, 3].map(|n| vals[n].clone().unwrap_or_default());
    for p in [&k, &h, &i, &z] {
        assert!(p.exists(), "{} does not exist", p.display());
    }
    Some(NodePeer {
        kubeconfig: k,
        helm: h,
        image_tar: i,
        ztunnel: z,
    })
}

/// Runs `prog args` (never a shell); `Err` names the command and its stderr.
pub fn run(prog: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("exec {}: {e}", prog.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}: {}{}",
            prog.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ctr` on the node's containerd, namespace `k8s.io` (the kubelet's images).
pub fn ctr(args: &[&str]) -> Result<String, String> {
    let mut a = vec!["--address", CONTAINERD_SOCK, "-n", "k8s.io"];
    a.extend_from_slice(args);
    run(Path::new("ctr"), &a)
}

/// The first `RepoTags` entry of a docker-archive tar (what `ctr images import` names it).
pub fn image_ref(tar: &Path) -> Result<String, String> {
    let path = tar.display().to_string();
    let text = run(Path::new("tar"), &["-xOf", &path, "manifest.json"])?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{path} manifest.json: {e}"))?;
    v[0]["RepoTags"][0]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{path}: manifest.json has no RepoTags"))
}

/// `types` of a conflist's `plugins`, in order (empty when it is not a conflist).
pub fn plugin_types(conflist: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(conflist).unwrap_or(Value::Null);
    v["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ambient-cni` is the last plugin of the node's conflist (and nowhere else).
pub fn chained_last() -> bool {
    let text = std::fs::read_to_string(NODE_CONFLIST).unwrap_or_default();
    let t = plugin_types(&text);
    t.last().map(String::as_str) == Some("ambient-cni")
        && t.iter().filter(|x| *x == "ambient-cni").count() == 1
}

/// Files in the node's CNI conf dir that mention ambient-cni.
pub fn conf_files_naming_us() -> Vec<PathBuf> {
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/cni/net.d") {
        for e in rd.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if text.contains("ambient-cni") {
                hits.push(e.path());
            }
        }
    }
    hits
}

/// Our files in the node's CNI bin dir (`ambient-cni`, `ambient-cni.tmp.*`).
pub fn bin_files_of_ours() -> Vec<PathBuf> {
    let mut hits = Vec::new();
    if let Ok(rd) = std::fs::read_dir(NODE_CNI_BIN) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("ambient-cni") {
                hits.push(e.path());
            }
        }
    }
    hits
}

/// Names of the host netns's nftables tables (`family name`).
pub fn host_nft_tables() -> Vec<String> {
    run(Path::new("nft"), &["list", "tables"])
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim_start_matches("table ").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The pinned netns in [`NETNS_DIR`] whose interfaces hold `ip` (a pod's sandbox).
pub fn netns_with_ip(ip: &str) -> Option<String> {
    let rd = std::fs::read_dir(NETNS_DIR).ok()?;
    let want = format!(" {ip}/");
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| {
            Command::new("ip")
                .args(["-n", name, "-o", "-4", "addr", "show"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&want))
                .unwrap_or(false)
        })
}

/// Whether a `/proc/<pid>/cgroup` text places the process in the pod with `uid` (kubelet's
/// cgroupfs `pod<uid>` or systemd `pod<uid with _>` slice).
pub fn cgroup_is_pod(cgroup: &str, uid: &str) -> bool {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    cgroup.contains(&dashed) || cgroup.contains(&underscored)
}

/// A host process: pid and argv.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its pid in the host pid namespace.
    pub pid: u32,
    /// Its argv.
    pub argv: Vec<String>,
}

/// The processes of the pod with `uid` (every container, the sandbox's pause included).
pub fn pod_processes(uid: &str) -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if !cgroup_is_pod(&cg, uid) {
            continue;
        }
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        if !argv.is_empty() {
            out.push(Proc { pid, argv });
        }
    }
    out
}

/// Whether argv is a sandbox's pause process (node.sh's pause image: `/pause`, or its
/// busybox fallback sleeping "forever").
pub fn is_pause(argv: &[String]) -> bool {
    argv.first().is_some_and(|a| a == "/pause") || argv.iter().any(|a| a == "2147483647")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_plugin_types_in_order() {
        let c = r#"{"cniVersion":"0.4.0","name":"k","plugins":[{"type":"bridge"},{"type":"portmap"},{"type":"ambient-cni"}]}"#;
        assert_eq!(plugin_types(c), ["bridge", "portmap", "ambient-cni"]);
        assert!(plugin_types("{not json").is_empty());
        assert!(plugin_types(r#"{"type":"bridge"}"#).is_empty());
    }

    #[test]
    fn pod_cgroups_both_drivers() {
        let uid = "0a1b2c3d-0000-4abc-8def-0123456789ab";
        let cgroupfs = "0::/kubepods/burstable/pod0a1b2c3d-0000-4abc-8def-0123456789ab/abc";
        let systemd = "0::/kubepods.slice/kubepods-pod0a1b2c3d_0000_4abc_8def_0123456789ab.slice/x";
        assert!(cgroup_is_pod(cgroupfs, uid));
        assert!(cgroup_is_pod(systemd, uid));
        assert!(!cgroup_is_pod("0::/user.slice/session-1.scope", uid));
    }

    #[test]
    fn pause_recognised() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_pause(&v(&["/pause"])));
        assert!(is_pause(&v(&["/bin/busybox", "sleep", "2147483647"])));
        assert!(!is_pause(&v(&["httpd", "-f", "-p", "8080"])));
    }
}
