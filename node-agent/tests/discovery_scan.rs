//! The /proc scan against real processes in real kubelet-style cgroups and real netns.
//!
//! Needs root and a writable cgroup2 hierarchy; skips otherwise (fails when `CI` is set).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambient_cni_agent::discovery::scan_for_pods;
use iptables_rules::netns::Netns;

fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs these tests as root"
    );
    eprintln!("skipped: needs root (netns, cgroups)");
    false
}

/// Mount point of the cgroup2 hierarchy (pure v2 or hybrid's `unified`).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Everything a test creates, removed on drop (also when the test fails).
#[derive(Default)]
struct World {
    netns: Vec<String>,
    children: Vec<Child>,
    /// Created cgroup dirs, parents first.
    cgroups: Vec<PathBuf>,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.cgroups.iter().rev() {
            // Shared parents (kubepods.slice) stay if something else uses them.
            let _ = std::fs::remove_dir(d);
        }
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

impl World {
    fn netns(&mut self, name: &str, ip: Option<&str>) -> u64 {
        run(&["ip", "netns", "add", name]);
        self.netns.push(name.to_owned());
        run(&["ip", "-n", name, "link", "set", "lo", "up"]);
        if let Some(ip) = ip {
            run(&[
                "ip",
                "-n",
                name,
                "addr",
                "add",
                &format!("{ip}/32"),
                "dev",
                "lo",
            ]);
        }
        std::fs::metadata(format!("/run/netns/{name}"))
            .unwrap()
            .ino()
    }

    /// A `sleep` in netns `ns` (or the host's), placed in pod `uid`'s container cgroup.
    fn process(&mut self, cg2: &Path, uid: &str, ns: Option<&str>, container: &str) -> u32 {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "sleep", "300"]);
                c
            }
            None => {
                let mut c = Command::new("sleep");
                c.arg("300");
                c
            }
        };
        let child = cmd.stdin(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        // Wait until `ip` has exec'd into sleep (so setns is done).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n" {
            assert!(Instant::now() < deadline, "pid {pid} never became sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pod_slice = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        let mut dir = cg2.to_owned();
        for part in [
            "kubepods.slice",
            "kubepods-besteffort.slice",
            pod_slice.as_str(),
            &format!("cri-containerd-{container}.scope"),
        ] {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
                self.cgroups.push(dir.clone());
            }
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        pid
    }
}

fn uid(tag: u32, n: u32) -> String {
    format!("{tag:08x}-{n:04x}-4abc-8def-0123456789ab")
}

fn container(n: u32) -> String {
    format!("{n:02x}").repeat(32)
}

#[test]
fn finds_pod_netns_by_cgroup_and_ip() {
    if !root_or_skip() {
        return;
    }
    let Some(cg2) = cgroup2_mount() else {
        assert!(std::env::var_os("CI").is_none(), "no cgroup2 mount");
        eprintln!("skipped: no cgroup2 hierarchy mounted");
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = std::process::id() ^ (nanos << 8);
    let net = format!("198.18.{}", tag % 250);
    let ns = |s: &str| format!("dscan-{tag:x}-{s}");
    let mut w = World::default();

    // A: oldest process in a1, a younger one in a2; both netns carry A's IP.
    let a = uid(tag, 0xa);
    let a1 = w.netns(&ns("a1"), Some(&format!("{net}.1")));
    let a2 = w.netns(&ns("a2"), Some(&format!("{net}.1")));
    w.process(&cg2, &a, Some(&ns("a1")), &container(1));
    std::thread::sleep(Duration::from_millis(60)); // starttime ticks are 10 ms
    w.process(&cg2, &a, Some(&ns("a2")), &container(2));
    w.process(&cg2, &a, Some(&ns("a1")), &container(3)); // a second container in a1
                                                         // B: its netns does not hold B's IP.
    let b = uid(tag, 0xb);
    w.netns(&ns("b"), Some(&format!("{net}.99")));
    w.process(&cg2, &b, Some(&ns("b")), &container(4));
    // C: in the host netns, which does hold C's "IP" (loopback).
    let c = uid(tag, 0xc);
    w.process(&cg2, &c, None, &container(5));
    // D: wanted but no IP known yet.
    let d = uid(tag, 0xd);
    w.netns(&ns("d"), Some(&format!("{net}.4")));
    w.process(&cg2, &d, Some(&ns("d")), &container(6));
    // E: a real pod that is not wanted.
    let e = uid(tag, 0xe);
    let e_ino = w.netns(&ns("e"), Some(&format!("{net}.5")));
    w.process(&cg2, &e, Some(&ns("e")), &container(7));
    // F: wanted, its netns holds one of its two IPs (second address).
    let f = uid(tag, 0xf);
    let f_ino = w.netns(&ns("f"), Some(&format!("{net}.6")));
    w.process(&cg2, &f, Some(&ns("f")), &container(8));

    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let wanted: HashMap<String, Vec<IpAddr>> = [
        (a.clone(), vec![ip(&format!("{net}.1"))]),
        (b.clone(), vec![ip(&format!("{net}.2"))]),
        (c.clone(), vec![ip("127.0.0.1")]),
        (d.clone(), vec![]),
        (f.clone(), vec![ip("fd00::6"), ip(&format!("{net}.6"))]),
    ]
    .into_iter()
    .collect();
    let host = Netns::host_id(Path::new("/proc")).unwrap();
    let found = scan_for_pods(Path::new("/proc"), &wanted, host);

    assert_eq!(
        found.get(&a).map(|n| n.id().ino),
        Some(a1),
        "oldest process's netns"
    );
    assert_ne!(a1, a2);
    assert!(
        !found.contains_key(&b),
        "netns without the pod's IP must be rejected"
    );
    assert!(!found.contains_key(&c), "the host netns is never a pod's");
    assert!(!found.contains_key(&d), "pods with no IP are skipped");
    assert!(!found.contains_key(&e), "only wanted pods");
    assert_eq!(found.get(&f).map(|n| n.id().ino), Some(f_ino));
    assert!(found.values().all(|n| n.id() != host));
    assert_eq!(found.len(), 2);
    let _ = e_ino;
}

#[test]
fn nothing_wanted_or_missing_proc_is_empty() {
    let host = Netns::host_id(Path::new("/proc")).unwrap();
    assert!(scan_for_pods(Path::new("/proc"), &HashMap::new(), host).is_empty());
    let wanted = [("x".to_owned(), vec!["10.0.0.1".parse().unwrap()])].into();
    assert!(scan_for_pods(Path::new("/nonexistent/proc"), &wanted, host).is_empty());
}
