//! `ambient-cni-agent validate-sidecar` (Istio's `istio-validation` check) in real netns:
//! without redirection it exits 126 with Istio's message; with REDIRECT rules for the proxy
//! uid it exits 0.
//!
//! Needs root; skips otherwise (fails when `CI` is set). Each netns is made by a thread's
//! `unshare` and held by an fd: nothing is left behind, also on failure.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use iptables_rules::netns::Netns;

const AGENT: &str = env!("CARGO_BIN_EXE_ambient-cni-agent");
/// The proxy uid the injected init container runs as.
const PROXY_UID: u32 = 1337;

fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs these tests as root"
    );
    eprintln!("skipped: needs root (netns, iptables)");
    false
}

/// A fresh netns with `lo` up, held by an fd of this process.
struct Pod {
    _keep: OwnedFd,
    ns: Netns,
}

fn pod_netns() -> Pod {
    let fd: OwnedFd = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap()
            .into()
    })
    .join()
    .unwrap();
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let ns = Netns::open(Path::new(&path), None).unwrap();
    let pod = Pod { _keep: fd, ns };
    pod.sh(&["ip", "link", "set", "lo", "up"]);
    pod
}

impl Pod {
    fn sh(&self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self
            .ns
            .run(move || Command::new(&args[0]).args(&args[1..]).output())
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the check in this netns as `uid`; its output and how long it took.
    fn validate(&self, uid: u32, timeout: &str) -> (Output, Duration) {
        let timeout = timeout.to_string();
        let start = Instant::now();
        let out = self
            .ns
            .run(move || {
                Command::new(AGENT)
                    .args(["validate-sidecar", "--probe-timeout", &timeout])
                    .uid(uid)
                    .gid(uid)
                    .output()
            })
            .unwrap()
            .unwrap();
        (out, start.elapsed())
    }
}

/// The REDIRECT Istio's rules amount to for the check's dial (proxy-owned loopback traffic
/// to anything but 127.0.0.1 goes to the inbound port).
fn redirect_rule(pod: &Pod, bin: &str, dst: &str) {
    pod.sh(&[
        bin,
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        dst,
        "-m",
        "owner",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
}

#[test]
fn without_redirection_the_check_fails_with_istios_code_and_message() {
    if !root_or_skip() {
        return;
    }
    let pod = pod_netns();
    let (out, took) = pod.validate(PROXY_UID, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(
        stderr.contains("iptables validation failed; workload is not ready for Istio."),
        "{stderr}"
    );
    assert!(stderr.contains("Listening on 127.0.0.1:15001"), "{stderr}");
    assert!(stderr.contains("Listening on 127.0.0.1:15006"), "{stderr}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn with_redirection_for_the_proxy_uid_the_check_passes() {
    if !root_or_skip() {
        return;
    }
    let pod = pod_netns();
    redirect_rule(&pod, "iptables", "127.0.0.6/32");
    let (out, took) = pod.validate(PROXY_UID, "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Validation passed"), "{stderr}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // The rules capture only the proxy's own loopback traffic: another uid is not redirected.
    let (out, _) = pod.validate(1000, "1");
    assert_eq!(
        out.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_ipv6_pod_is_checked_on_ipv6_loopback() {
    if !root_or_skip() {
        return;
    }
    let pod = pod_netns();
    pod.sh(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    pod.sh(&["ip", "link", "set", "peer0", "up"]);
    pod.sh(&["ip", "link", "set", "eth0", "up"]);
    pod.sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00::5/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    pod.sh(&["ip", "-6", "route", "add", "default", "dev", "eth0"]);
    // IPv4 rules do not help an IPv6 pod.
    redirect_rule(&pod, "iptables", "127.0.0.6/32");
    let (out, _) = pod.validate(PROXY_UID, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(stderr.contains("Listening on [::1]:15006"), "{stderr}");

    redirect_rule(&pod, "ip6tables", "::6/128");
    let (out, _) = pod.validate(PROXY_UID, "3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn serve_answers_with_the_original_destination_port() {
    if !root_or_skip() {
        return;
    }
    let pod = pod_netns();
    pod.sh(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    pod.sh(&["ip", "link", "set", "peer0", "up"]);
    pod.sh(&["ip", "link", "set", "eth0", "up"]);
    pod.sh(&["ip", "addr", "add", "10.44.2.5/24", "dev", "eth0"]);
    pod.sh(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.44.2.5/32",
        "--dport",
        "8080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    let mut child = pod
        .ns
        .run(|| {
            Command::new(AGENT)
                .args(["validate-sidecar", "--serve"])
                .uid(PROXY_UID)
                .gid(PROXY_UID)
                .spawn()
        })
        .unwrap()
        .unwrap();
    let got = pod
        .ns
        .run(|| {
            use std::io::Read as _;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::net::TcpStream::connect("10.44.2.5:8080") {
                    Ok(mut s) => {
                        let mut out = String::new();
                        let _ = s.read_to_string(&mut out);
                        return out;
                    }
                    Err(e) if Instant::now() > deadline => return format!("connect: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, "8080");
}
