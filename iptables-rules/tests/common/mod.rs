//! Shared test helpers: the golden cases, root checks, throw-away netns.
#![allow(dead_code)]

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use iptables_rules::{HostProbeConfig, InpodConfig};

#[path = "../goldens_dir/mod.rs"]
mod goldens_dir;
#[allow(unused_imports)]
pub use goldens_dir::{goldens, have_goldens, have_sidecar_goldens, sidecar_goldens};

/// The v6 SNAT address Istio's in-pod goldens use.
pub fn test_snat_v6() -> Ipv6Addr {
    "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164".parse().unwrap()
}

/// (golden base name, config) for every in-pod case, each also with `_ipv6`.
pub fn inpod_cases() -> Vec<(String, InpodConfig)> {
    let vifs = vec!["fake1s0f0".to_string(), "fake1s0f1".to_string()];
    let base: Vec<(&str, bool, bool, Vec<String>)> = vec![
        ("default", true, false, vec![]),
        ("dns_pod_enabled_and_off_globally", true, false, vec![]),
        ("dns_pod_disabled_and_on_globally", false, false, vec![]),
        ("ingress", false, true, vec![]),
        ("virtual_interfaces", false, false, vifs.clone()),
        ("ingress_and_virtual_interfaces", false, true, vifs),
    ];
    let mut out = Vec::new();
    for (name, dns, bypass, v) in base {
        for ipv6 in [false, true] {
            let cfg = InpodConfig {
                dns_capture: dns,
                bypass_inbound: bypass,
                virtual_interfaces: v.clone(),
                ipv6,
                probe_snat_v6: test_snat_v6(),
                ..InpodConfig::default()
            };
            let n = if ipv6 {
                format!("{name}_ipv6")
            } else {
                name.to_string()
            };
            out.push((n, cfg));
        }
    }
    out
}

/// Host probe config of the iptables goldens (default v6 SNAT).
pub fn hostprobe_iptables(ipv6: bool) -> HostProbeConfig {
    HostProbeConfig {
        ipv6,
        ..HostProbeConfig::default()
    }
}

/// Host probe config of the nft goldens (stub kubelet UID 1000, test v6 SNAT).
pub fn hostprobe_nft(ipv6: bool) -> HostProbeConfig {
    HostProbeConfig {
        ipv6,
        probe_snat_v6: test_snat_v6(),
        kubelet_uid: Some(1000),
        ..HostProbeConfig::default()
    }
}

/// An iptables golden's restore text (without the leading `*-save` command lines), split
/// into the IPv4 part and the IPv6 part (empty if none).
pub fn iptables_golden(name: &str) -> (String, String) {
    let text = std::fs::read_to_string(goldens().join(format!("iptables/{name}.golden"))).unwrap();
    let lines: Vec<&str> = text.lines().skip(2).collect();
    // The v6 text starts at the second occurrence of the first table header.
    let first = lines[0];
    let split = lines
        .iter()
        .skip(1)
        .position(|l| *l == first)
        .map(|i| i + 1)
        .unwrap_or(lines.len());
    let v4 = lines[..split].iter().map(|l| format!("{l}\n")).collect();
    let v6 = lines[split..].iter().map(|l| format!("{l}\n")).collect();
    (v4, v6)
}

/// An nft golden's text.
pub fn nft_golden(name: &str) -> String {
    std::fs::read_to_string(goldens().join(format!("nftables/{name}.golden"))).unwrap()
}

/// True if the test may do root things; false (after printing why) to skip.
/// Panics under `CI`, where root tests must run.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run as root"
    );
    eprintln!("skipped {test}: needs root");
    false
}

/// Runs `f` on a thread inside a new network namespace with `lo` up, as in a pod (an IPv6
/// local route needs it); the netns goes away with the thread, nothing to clean up.
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        sh(&["ip", "link", "set", "lo", "up"]);
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A named netns (`ip netns add`), deleted on drop.
pub struct NamedNetns {
    /// The name.
    pub name: String,
}

impl NamedNetns {
    /// Creates `rc-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rc-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The bind-mount path.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs a command in the netns, panicking on failure; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Runs a command in the netns with stdin.
    pub fn exec_stdin(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write;
        let mut v = vec!["netns", "exec", &self.name];
        v.extend_from_slice(args);
        let mut child = std::process::Command::new("ip")
            .args(&v)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Opens it as a [`iptables_rules::netns::Netns`].
    pub fn open(&self) -> iptables_rules::netns::Netns {
        iptables_rules::netns::Netns::open(&self.path(), None).unwrap()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command (no shell), panicking with its stderr on failure.
pub fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
