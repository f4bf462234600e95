//! Pods "already running" the way a kubelet leaves them: a netns holding the pod's
//! IP and a process in it, placed in a cgroup v2 path named like kubelet's
//! (systemd driver, containerd), so the agent's /proc scan can find them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ip, NamedNetns};

/// Where cgroup2 is mounted (pure v2, or hybrid's `unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mount = pre.split_whitespace().nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// A UID shaped like Kubernetes' (the cgroup parser expects a UUID).
pub fn pod_uid(tag: u32, n: u32) -> String {
    format!("{tag:08x}-{n:04x}-4abc-8def-0123456789ab")
}

/// A running pod: netns + an interface with `ip/24` + a `sleep` in a kubelet-style cgroup.
#[derive(Debug)]
pub struct RunningPod {
    /// Its netns.
    pub netns: NamedNetns,
    /// Its UID.
    pub uid: String,
    /// Its IP.
    pub ip: String,
    child: Child,
    cgroups: Vec<PathBuf>,
}

impl RunningPod {
    /// Starts one; `ip` like `10.96.1.5` (given a /24 on a veth inside, so the subnet is routable).
    pub fn start(uid: &str, ip_addr: &str) -> Self {
        let netns = NamedNetns::new();
        let n = netns.name();
        // A veth pair with both ends inside (no dummy module needed) makes the /24 routable.
        ip(&[
            "-n", n, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "d0",
        ]);
        ip(&["-n", n, "link", "set", "d0", "up"]);
        ip(&["-n", n, "link", "set", "d1", "up"]);
        let child = Command::new("ip")
            .args(["netns", "exec", n, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
        {
            assert!(Instant::now() < deadline, "pid {pid} never became sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut me = Self {
            netns,
            uid: uid.to_owned(),
            ip: ip_addr.to_owned(),
            child,
            cgroups: Vec::new(),
        };
        let root = cgroup2_mount().expect("cgroup2 mounted");
        let pod_slice = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        let scope = format!("cri-containerd-{:0>64}.scope", uid.replace('-', ""));
        let mut dir = root;
        for part in [
            "kubepods.slice",
            "kubepods-besteffort.slice",
            &pod_slice,
            &scope,
        ] {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).expect("create cgroup");
                me.cgroups.push(dir.clone());
            }
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move to cgroup");
        me
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in self.cgroups.iter().rev() {
            // Shared parents stay while another pod uses them.
            let _ = std::fs::remove_dir(d);
        }
    }
}
