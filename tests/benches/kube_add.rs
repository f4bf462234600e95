//! The Kubernetes path (issue 18): captured-pod ADDs with the pods in a REAL kube-apiserver and
//! the agent on its kube source (pod lookup and the status annotation patch in the path), stock
//! ztunnel acking, per rules backend; beside Istio's per-pod path reproduced step by step in the
//! same run on the same machine, and `/bin/true` timed by the same harness.
//!
//! Istio's path, per pod (each step as Istio does it, timed together): exec of the CNI plugin
//! (here `/bin/true`: Istio's Go plugin starts slower, so the baseline is a floor), a new
//! Kubernetes client with GET pod + GET namespace (the plugin is a new process per ADD: new TLS
//! connection), an HTTP POST to the node agent over a unix socket, `iptables-save` +
//! `ip6tables-save` + `iptables-restore --noflush` inside the pod netns (iptables-nft), and
//! ZDS AddWorkload + ack to stock ztunnel (a ZDS server on the shared `zds::socket` module).
//!
//! `cargo bench -p ambient-cni-tests --bench kube_add` (root, `ZTUNNEL_BIN`; `KUBE_BENCH_PODS`,
//! default 200). The kube-apiserver: the one in `KUBECONFIG` + `KUBE_PEER_DIR` when both are set,
//! else its own (`../shared/peers/kube.sh start --port <6500-6599>`, or `KUBE_SH`'s, stopped at
//! the end).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ambient_cni_api::zds::socket as zds_socket;
use ambient_cni_api::zds::{
    workload_request::Payload, workload_response, AddWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello,
};
use ambient_cni_tests::bench::{
    add_in, answer, mean, pct, phase_table, phases, plugin_conf, pods_from_env, proc_cpu_ms,
    where_time_goes, PhaseRow,
};
use ambient_cni_tests::peers::{xds_yaml, XdsWorkload, Ztunnel};
use ambient_cni_tests::*;
use iptables_rules::model::Family;
use iptables_rules::netns::Netns;
use iptables_rules::{exec, inpod_ruleset, render, InpodConfig};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::Client;
use prost::Message;
use serde_json::json;

const SA: &str = "workload";
const ANNOTATION: &str = "ambient.istio.io/redirection";

/// The kube-apiserver the bench talks to; stopped on drop when the bench started it.
struct Kube {
    kubeconfig: PathBuf,
    own_dir: Option<PathBuf>,
    script: PathBuf,
}

impl Kube {
    /// The peer from the environment, else a new instance on a random port in 6500-6599.
    fn get() -> Option<Kube> {
        // `KUBE_SH` for a checkout that is not beside `shared/` (a git worktree elsewhere).
        let script = std::env::var_os("KUBE_SH")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/kube.sh")
            });
        if let (Some(kc), Some(_)) = (
            std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()),
            std::env::var_os("KUBE_PEER_DIR").filter(|v| !v.is_empty()),
        ) {
            return Some(Kube {
                kubeconfig: kc.into(),
                own_dir: None,
                script,
            });
        }
        if !script.exists() {
            eprintln!("kube_add: no kube-apiserver (KUBECONFIG unset, no ../shared/peers/kube.sh)");
            return None;
        }
        let port = Self::free_port(&script)?;
        let t0 = Instant::now();
        let out = Command::new(&script)
            .args(["start", "--port", &port.to_string()])
            .output()
            .expect("exec kube.sh");
        let text = String::from_utf8_lossy(&out.stdout);
        let var = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(PathBuf::from)
        };
        match (
            out.status.success(),
            var("KUBECONFIG"),
            var("KUBE_PEER_DIR"),
        ) {
            (true, Some(kubeconfig), Some(dir)) => {
                // Said, so a run shows that it started (not found) an instance.
                eprintln!(
                    "kube_add: kube-apiserver started on port {port} in {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                Some(Kube {
                    kubeconfig,
                    own_dir: Some(dir),
                    script,
                })
            }
            _ => {
                eprintln!(
                    "kube_add: kube.sh start --port {port} failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                None
            }
        }
    }
}

impl Kube {
    /// A random port in 6500-6599 that is free and no instance's: `kube.sh start` given a
    /// running instance's port only prints it, and the bench must never stop another's.
    fn free_port(script: &Path) -> Option<u16> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
            ^ std::process::id();
        for i in 0..100u32 {
            let port = 6500 + (seed.wrapping_add(i * 37) % 100) as u16;
            let in_use = std::net::TcpListener::bind(("127.0.0.1", port)).is_err();
            // Exit 3: no instance there.
            let instance = Command::new(script)
                .args(["status", "--port", &port.to_string()])
                .output()
                .map(|o| o.status.code() != Some(3))
                .unwrap_or(true);
            if !in_use && !instance {
                return Some(port);
            }
        }
        eprintln!("kube_add: no free port in 6500-6599");
        None
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        if let Some(dir) = &self.own_dir {
            let _ = Command::new(&self.script)
                .arg("stop")
                .arg("--dir")
                .arg(dir)
                .output();
        }
    }
}

async fn client_for(kubeconfig: &Path) -> Client {
    ambient_cni_tests::peers::kube_client(kubeconfig)
        .await
        .expect("kubeconfig")
}

/// The bench's cluster objects: one labelled namespace with the workloads' ServiceAccount.
struct Cluster {
    rt: tokio::runtime::Runtime,
    admin: Client,
    kubeconfig: PathBuf,
    ns: String,
}

impl Cluster {
    fn new(kubeconfig: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let admin = rt.block_on(client_for(kubeconfig));
        let ns = unique("kb");
        let obj: Namespace = serde_json::from_value(
            json!({"metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        )
        .expect("namespace");
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": SA}})).expect("sa");
        rt.block_on(async {
            Api::<Namespace>::all(admin.clone())
                .create(&PostParams::default(), &obj)
                .await
                .expect("create namespace");
            Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
                .create(&PostParams::default(), &sa)
                .await
                .expect("create ServiceAccount");
        });
        Self {
            rt,
            admin,
            kubeconfig: kubeconfig.to_owned(),
            ns,
        }
    }

    /// Creates pods `prefix0..` bound to `node`; returns (name, uid) each.
    fn pods(&self, prefix: &str, n: usize, node: &str) -> Vec<(String, String)> {
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), &self.ns);
        (0..n)
            .map(|i| {
                let name = format!("{prefix}{i}");
                let p: Pod = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"nodeName": node, "serviceAccountName": SA,
                        "automountServiceAccountToken": false,
                        "containers": [{"name": "app", "image": "app"}]},
                }))
                .expect("pod");
                let created = self
                    .rt
                    .block_on(api.create(&PostParams::default(), &p))
                    .expect("create pod");
                (name, created.metadata.uid.expect("uid"))
            })
            .collect()
    }

    /// How many of `names` carry the redirection annotation `enabled`.
    fn annotated(&self, names: &[&str]) -> usize {
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), &self.ns);
        let list = self
            .rt
            .block_on(api.list(&Default::default()))
            .map(|l| l.items)
            .unwrap_or_default();
        list.iter()
            .filter(|p| names.contains(&p.metadata.name.as_deref().unwrap_or_default()))
            .filter(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION))
                    .map(String::as_str)
                    == Some("enabled")
            })
            .count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.admin.clone());
        let _ = self.rt.block_on(api.delete(&self.ns, &Default::default()));
    }
}

fn xds_for(ns: &str, pods: &[(String, String)]) -> String {
    let w: Vec<XdsWorkload> = pods
        .iter()
        .map(|(name, _)| XdsWorkload::new(ns, name, SA))
        .collect();
    xds_yaml(&w)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One of our measures: sequential ADD times, the phase table, and how long after the last
/// ADD every status annotation was visible.
struct Ours {
    times: Vec<Duration>,
    phases: String,
    rows: Vec<PhaseRow>,
    answer: Option<PhaseRow>,
    annotated_after: Option<Duration>,
    /// CPU the API server, etcd and the controller manager used per ADD during the ADDs, ms.
    cluster_cpu_per_add: f64,
    /// CPU the agent used per ADD during the ADDs, ms.
    agent_cpu_per_add: f64,
}

/// The kube peer's processes (kube-apiserver, etcd, the controller manager), by name in /proc.
fn cluster_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| matches!(c.trim(), "kube-apiserver" | "etcd" | "kube-controller"))
        })
        .collect()
}

/// Puts every thread of the kube peer's processes under SCHED_IDLE (`idle`) or back to
/// SCHED_OTHER: idle, they run only on CPU the node's own work leaves, as if they ran on
/// other machines (on a real cluster they do: a worker node runs no API server).
fn cluster_idle(idle: bool) -> bool {
    let policy = if idle { "--idle" } else { "--other" };
    cluster_pids().into_iter().all(|pid| {
        std::process::Command::new("chrt")
            .args(["--all-tasks", policy, "--pid", "0", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The kube peer under SCHED_IDLE while it lives (back to SCHED_OTHER on drop, a panic too).
struct IdleCluster;

impl IdleCluster {
    fn new() -> Self {
        assert!(
            cluster_idle(true),
            "chrt --idle on the kube peer's processes"
        );
        Self
    }
}

impl Drop for IdleCluster {
    fn drop(&mut self) {
        if !cluster_idle(false) {
            eprintln!("kube_add: could not put the kube peer back to SCHED_OTHER");
        }
    }
}

/// [`proc_cpu_ms`] summed over the kube peer's processes (kube-apiserver, etcd, the controller
/// manager), found by name in /proc.
fn cluster_cpu_ms() -> f64 {
    cluster_pids().into_iter().map(proc_cpu_ms).sum()
}

/// Our ADDs, back to back, on the kube source with the agent's extra `args` (its rules
/// backend), stock ztunnel acking (the stand-in when `zt_bin` is `None`).
fn ours(c: &Cluster, zt_bin: Option<&Path>, args: &[&str], prefix: &str, n: usize) -> Ours {
    let dir = TempDir::new("acni-kbench");
    let node = unique("kbnode");
    let pods = c.pods(prefix, n, &node);
    std::fs::write(dir.join("xds.yaml"), xds_for(&c.ns, &pods)).expect("xds file");
    let metrics = format!("127.0.0.1:{}", free_port());
    // Pods exist before the agent starts: its initial list holds them (the steady state).
    let mut all = vec![
        "--log-level",
        "warn,ambient_cni_agent::mesh::controller=info",
        "--metrics-addr",
        &metrics,
    ];
    all.extend_from_slice(args);
    let agent = AgentProcess::start_kube(&dir.0, &c.kubeconfig, &node, &all);
    let (z, standin) = match zt_bin {
        Some(bin) => {
            let z = Ztunnel::start(
                bin,
                &dir.join("ztunnel.sock"),
                &dir.join("xds.yaml"),
                &dir.join("zt.log"),
            );
            assert!(
                z.wait_ready(Duration::from_secs(20)),
                "ztunnel not ready:\n{}",
                z.log_text()
            );
            (Some(z), None)
        }
        None => {
            let s = Standin::start(
                &dir.join("ztunnel.sock"),
                &dir.join("standin.jsonl"),
                &["--no-dns"],
            );
            assert!(s.wait_count("snapshot_sent", 1, Duration::from_secs(10)));
            (None, Some(s))
        }
    };
    let conf: serde_json::Value =
        serde_json::from_str(&plugin_conf(&agent.socket)).expect("plugin conf");
    let netns: Vec<NamedNetns> = pods.iter().map(|_| NamedNetns::new()).collect();
    let mut times = Vec::with_capacity(n);
    let cpu0 = [cluster_cpu_ms(), proc_cpu_ms(agent.pid())];
    for ((name, uid), ns) in pods.iter().zip(&netns) {
        // Each pod its own IP, as on a node: the host probe set then adds an element per pod
        // instead of replacing one shared element's owner.
        let mut conf = conf.clone();
        let i = times.len();
        conf["prevResult"]["ips"][0]["address"] =
            format!("10.97.{}.{}/16", i / 250, i % 250 + 2).into();
        let out = add_in(&conf.to_string(), &c.ns, ns, name, uid);
        assert_eq!(out.code, 0, "{} {}", out.stdout, agent.log_text());
        times.push(out.elapsed);
    }
    let last = Instant::now();
    let cpu = |now: [f64; 2]| (now[0] - cpu0[0], now[1] - cpu0[1]);
    let (cluster_cpu, agent_cpu) = cpu([cluster_cpu_ms(), proc_cpu_ms(agent.pid())]);
    let names: Vec<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
    let done = wait_for(Duration::from_secs(20), || c.annotated(&names) == n);
    let annotated_after = done.then(|| last.elapsed());
    let addr = metrics.parse().expect("metrics addr");
    let body = match http::get(addr, "/metrics", Duration::from_secs(5)) {
        Ok((200, body)) => body,
        _ => String::new(),
    };
    let (phases, rows) = (phase_table(&body), self::phases(&body).unwrap_or_default());
    let answer = answer(&body);
    if let Some(z) = &z {
        let started = z.log_text().matches("pod received, starting proxy").count();
        assert_eq!(started, n, "ztunnel started a proxy per ADD");
    }
    drop(z);
    drop(standin);
    drop(agent);
    Ours {
        times,
        phases,
        rows,
        answer,
        annotated_after,
        cluster_cpu_per_add: cluster_cpu / n as f64,
        agent_cpu_per_add: agent_cpu / n as f64,
    }
}

/// The node agent's HTTP endpoint in Istio's path: reads one request, answers 200, closes.
fn http_server(path: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).expect("bind http socket");
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body_len = loop {
                let Ok(k) = s.read(&mut buf) else { break None };
                if k == 0 {
                    break None;
                }
                req.extend_from_slice(&buf[..k]);
                if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break Some((end + 4, len));
                }
            };
            let Some((start, len)) = body_len else {
                continue;
            };
            while req.len() < start + len {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&buf[..k]),
                }
            }
            if &req[start..] == b"stop" {
                return;
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    })
}

/// POSTs `body` over the unix socket at `path` and reads the whole answer; returns its status.
fn post(path: &Path, body: &str) -> String {
    let mut s = UnixStream::connect(path).expect("connect http socket");
    let req = format!(
        "POST /cmdadd HTTP/1.1\r\nHost: istio-cni\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("POST");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.lines().next().unwrap_or_default().to_owned()
}

/// A ZDS server for stock ztunnel: accepts its connection, sends the (empty) snapshot.
struct ZdsPeer {
    conn: OwnedFd,
}

impl ZdsPeer {
    fn serve(listener: OwnedFd) -> std::thread::JoinHandle<ZdsPeer> {
        std::thread::spawn(move || {
            use std::os::fd::{AsRawFd, FromRawFd};
            let raw = nix::sys::socket::accept(listener.as_raw_fd()).expect("accept ztunnel");
            // SAFETY: accept returned a new fd nothing else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut buf = [0u8; 1024];
            let zds_socket::Recv::Packet(n) =
                zds_socket::recv(conn.as_fd(), &mut buf).expect("hello")
            else {
                panic!("ztunnel closed before its hello")
            };
            let hello = ZdsHello::decode(&buf[..n]).expect("ZdsHello");
            assert_eq!(hello.version, Version::V1 as i32);
            let me = ZdsPeer { conn };
            let done = WorkloadRequest {
                payload: Some(Payload::SnapshotSent(SnapshotSent {})),
            };
            assert_eq!(me.exchange(&done, None), "");
            me
        })
    }

    /// Sends one request (with `fd`) and returns the ack's error text ("" = ack).
    fn exchange(&self, req: &WorkloadRequest, fd: Option<std::os::fd::BorrowedFd<'_>>) -> String {
        zds_socket::send(self.conn.as_fd(), &req.encode_to_vec(), fd).expect("send to ztunnel");
        let mut buf = [0u8; 1024];
        let zds_socket::Recv::Packet(n) =
            zds_socket::recv(self.conn.as_fd(), &mut buf).expect("ack")
        else {
            panic!("ztunnel closed instead of acking")
        };
        match WorkloadResponse::decode(&buf[..n]).expect("ack").payload {
            Some(workload_response::Payload::Ack(a)) => a.error,
            None => panic!("ack without payload"),
        }
    }
}

fn listen_seqpacket(path: &Path) -> OwnedFd {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind ZDS socket");
    listen(&fd, Backlog::new(8).expect("backlog")).expect("listen");
    fd
}

/// Istio's per-pod path; returns the totals and each step's times.
fn istio_path(
    c: &Cluster,
    zt_bin: &Path,
    n: usize,
) -> (Vec<Duration>, Vec<(&'static str, Vec<Duration>)>) {
    let dir = TempDir::new("acni-kbistio");
    let pods = c.pods("i", n, "istio-node");
    std::fs::write(dir.join("xds.yaml"), xds_for(&c.ns, &pods)).expect("xds file");
    let sock = dir.join("ztunnel.sock");
    let peer = ZdsPeer::serve(listen_seqpacket(&sock));
    let z = Ztunnel::start(zt_bin, &sock, &dir.join("xds.yaml"), &dir.join("zt.log"));
    let peer = peer.join().expect("ZDS peer");
    assert!(
        z.wait_ready(Duration::from_secs(20)),
        "ztunnel not ready:\n{}",
        z.log_text()
    );
    let http_sock = dir.join("pluginevent.sock");
    let server = http_server(&http_sock);
    let text = render::iptables_restore(&inpod_ruleset(&InpodConfig::default()), Family::V4);
    let netns: Vec<NamedNetns> = pods.iter().map(|_| NamedNetns::new()).collect();
    let names = [
        "plugin exec",
        "GET pod + GET namespace",
        "HTTP POST",
        "iptables 2 save + restore",
        "ZDS add + ack",
    ];
    let mut steps: Vec<(&'static str, Vec<Duration>)> =
        names.iter().map(|s| (*s, Vec::new())).collect();
    let mut totals = Vec::with_capacity(n);
    for ((name, uid), ns) in pods.iter().zip(&netns) {
        let t0 = Instant::now();
        let e = exec_timed(Command::new("/bin/true"), b"", Duration::from_secs(5));
        assert_eq!(e.code, 0);
        let t1 = Instant::now();
        c.rt.block_on(async {
            let client = client_for(&c.kubeconfig).await;
            Api::<Pod>::namespaced(client.clone(), &c.ns)
                .get(name)
                .await
                .expect("GET pod");
            Api::<Namespace>::all(client)
                .get(&c.ns)
                .await
                .expect("GET namespace");
        });
        let t2 = Instant::now();
        let status = post(
            &http_sock,
            &json!({"netns": ns.path(), "podName": name, "podNamespace": c.ns, "podUid": uid})
                .to_string(),
        );
        assert!(status.contains(" 200 "), "{status}");
        let t3 = Instant::now();
        let pod_ns = Netns::open(Path::new(&ns.path()), None).expect("open pod netns");
        pod_ns
            .run(|| {
                exec::run("iptables-nft", "iptables-nft-save", &[], None).expect("save");
                exec::run("iptables-nft", "ip6tables-nft-save", &[], None).expect("save6");
                exec::run(
                    "iptables-nft",
                    "iptables-nft-restore",
                    &["--noflush"],
                    Some(text.as_bytes()),
                )
                .expect("restore");
            })
            .expect("netns");
        let t4 = Instant::now();
        let add = WorkloadRequest {
            payload: Some(Payload::Add(AddWorkload {
                uid: uid.clone(),
                workload_info: Some(WorkloadInfo {
                    name: name.clone(),
                    namespace: c.ns.clone(),
                    service_account: SA.into(),
                }),
            })),
        };
        let f = std::fs::File::open(ns.path()).expect("open netns");
        assert_eq!(
            peer.exchange(&add, Some(f.as_fd())),
            "",
            "ztunnel nacked {name}"
        );
        let t5 = Instant::now();
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]
            .into_iter()
            .enumerate()
        {
            steps[i].1.push(d);
        }
        totals.push(t5 - t0);
    }
    let _ = post(&http_sock, "stop");
    let _ = server.join();
    let started = z.log_text().matches("pod received, starting proxy").count();
    assert_eq!(started, n, "ztunnel started a proxy per AddWorkload");
    drop(z);
    drop(peer);
    (totals, steps)
}

/// The rules phase's floor, measured alone in the same run: entering a fresh netns and
/// installing the agent's default in-pod rules (IPv4 + IPv6, DNS on) and policy route with
/// `kind`, as the agent does, without the agent around it. p50 in ms.
fn rules_alone(kind: iptables_rules::backend::BackendKind, n: usize) -> f64 {
    let Ok(b) = iptables_rules::backend::make(kind) else {
        return f64::NAN;
    };
    let r = iptables_rules::redirector::Redirector::new(b);
    let cfg = InpodConfig {
        ipv6: true,
        ..InpodConfig::default()
    };
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let ns = NamedNetns::new();
        let pod_ns = Netns::open(Path::new(&ns.path()), None).expect("open netns");
        let t = Instant::now();
        r.apply(&pod_ns, &cfg).expect("apply rules alone");
        v.push(t.elapsed());
    }
    pct(&v, 50)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    if !require_root("kube_add bench") {
        return;
    }
    let Some(zt) = std::env::var_os("ZTUNNEL_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "ZTUNNEL_BIN is unset and CI is set"
        );
        eprintln!("kube_add: ZTUNNEL_BIN is unset: skipped (see ../shared/peers/README.md)");
        return;
    };
    let Some(kube) = Kube::get() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "no kube-apiserver and CI is set"
        );
        return;
    };
    let n = pods_from_env("KUBE_BENCH_PODS", 200);
    let c = Cluster::new(&kube.kubeconfig);
    let floor = ambient_cni_tests::bench::harness_rows();
    let (t50, t99) = (floor[0].1, floor[0].2);
    let (istio, steps) = istio_path(&c, &zt, n);
    let (i50, i99) = (pct(&istio, 50), pct(&istio, 99));
    const NFT: &[&str] = &["--rules-backend", "nftables"];
    const IPT: &[&str] = &["--rules-backend", "iptables"];
    let nft = ours(&c, Some(&zt), NFT, "n", n);
    let standin = ours(&c, None, NFT, "s", n);
    let yielding = {
        let _idle = IdleCluster::new();
        ours(&c, Some(&zt), NFT, "y", n)
    };
    let ipt = ours(&c, Some(&zt), IPT, "t", n);
    let ipt4 = ours(
        &c,
        Some(&zt),
        &["--rules-backend", "iptables", "--ambient-ipv6=false"],
        "f",
        n,
    );
    let nft_alone = rules_alone(iptables_rules::backend::BackendKind::Nftables, 50);
    let ipt_alone = rules_alone(iptables_rules::backend::BackendKind::Iptables, 50);
    let zds_alone = pct(&steps[4].1, 50);

    println!("captured-pod ADD, {n} pods sequential, pods in a real kube-apiserver (v1.20.2), stock ztunnel acking; agent on `--pod-source kube`\n");
    println!("| path | p50 ms | p99 ms | p50 over /bin/true | Istio's path ÷ this at p50 | target | verdict |");
    println!("|---|---|---|---|---|---|---|");
    println!("| /bin/true, same harness (floor) | {t50:.2} | {t99:.2} | - | - | - | - |");
    println!("| Istio's path (baseline, iptables-nft) | {i50:.2} | {i99:.2} | +{:.2} ms | 1.0x | - | - |", i50 - t50);
    let row = |what: &str, o: &Ours, target: &str, ok: bool| {
        let (p50, p99) = (pct(&o.times, 50), pct(&o.times, 99));
        println!(
            "| {what} | {p50:.2} | {p99:.2} | +{:.2} ms (p99 +{:.2} ms) | {:.1}x | {target} | {} |",
            p50 - t50,
            p99 - t99,
            i50 / p50,
            if ok { "met" } else { "NOT met" }
        );
    };
    let (n50, n99) = (pct(&nft.times, 50), pct(&nft.times, 99));
    row(
        "ours, nftables, kube source",
        &nft,
        "p50 ≤ 1.0 ms and p99 ≤ 2.5 ms over /bin/true",
        n50 - t50 <= 1.0 && n99 - t99 <= 2.5,
    );
    let (p50, p99) = (pct(&standin.times, 50), pct(&standin.times, 99));
    println!(
        "| ours, nftables, kube source, ztunnel stand-in | {p50:.2} | {p99:.2} | +{:.2} ms (p99 +{:.2} ms) | {:.1}x | (attribution, not a target row) | - |",
        p50 - t50,
        p99 - t99,
        i50 / p50,
    );
    let (p50, p99) = (pct(&yielding.times, 50), pct(&yielding.times, 99));
    println!(
        "| ours, nftables, kube source, the API server, etcd and controller manager at SCHED_IDLE (as if on other machines) | {p50:.2} | {p99:.2} | +{:.2} ms (p99 +{:.2} ms) | {:.1}x | (attribution, not a target row) | - |",
        p50 - t50,
        p99 - t99,
        i50 / p50,
    );
    row(
        "ours, iptables, kube source",
        &ipt,
        "p50 ≤ 4 ms",
        pct(&ipt.times, 50) <= 4.0,
    );
    let (p50, p99) = (pct(&ipt4.times, 50), pct(&ipt4.times, 99));
    println!(
        "| ours, iptables, kube source, IPv4 only (`AMBIENT_IPV6=false`: one `iptables-restore`) | {p50:.2} | {p99:.2} | +{:.2} ms (p99 +{:.2} ms) | {:.1}x | p50 ≤ 4 ms | {} |",
        p50 - t50,
        p99 - t99,
        i50 / p50,
        if p50 <= 4.0 { "met" } else { "NOT met" }
    );
    println!(
        "\nours (nftables) vs Istio's path at p50: {:.1}x faster (target ≥ 10x: {})",
        i50 / n50,
        if i50 / n50 >= 10.0 { "met" } else { "NOT met" }
    );
    for (what, o) in [("nftables", &nft), ("iptables", &ipt)] {
        match o.annotated_after {
            Some(d) => println!(
                "status annotation ({what}): all {n} pods `enabled` {:.0} ms after the last ADD returned",
                ms(d)
            ),
            None => println!("status annotation ({what}): NOT all {n} pods annotated within 20 s"),
        }
    }
    for (what, o) in [("nftables", &nft), ("iptables", &ipt)] {
        println!(
            "CPU per ADD while the ADDs ran ({what}): API server + etcd + controller manager {:.2} ms, the agent {:.2} ms",
            o.cluster_cpu_per_add, o.agent_cpu_per_add
        );
    }
    println!("\nIstio's path, where its time goes (same run):\n");
    println!("| step | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (name, v) in &steps {
        println!("| {name} | {:.2} | {:.2} |", pct(v, 50), pct(v, 99));
    }
    for (what, o) in [
        ("nftables", &nft),
        ("iptables", &ipt),
        ("iptables, IPv4 only", &ipt4),
    ] {
        println!("\nour ADD's phases, {what}, kube source, stock ztunnel (the agent's own clock, `ambient_cni_add_phase_seconds`):\n");
        print!("{}", o.phases);
    }
    println!("\nWhere the time goes (same run):\n");
    let tmean = floor[0].3;
    for (what, o) in [
        ("nftables", &nft),
        ("nftables, ztunnel stand-in", &standin),
        ("nftables, cluster at SCHED_IDLE", &yielding),
        ("iptables", &ipt),
        ("iptables, IPv4 only", &ipt4),
    ] {
        println!(
            "- {}",
            where_time_goes(
                &format!("ours, {what}"),
                &o.times,
                tmean,
                &o.rows,
                o.answer.as_ref()
            )
        );
    }
    // A phase's p50 or p99 in ms (NaN when the agent did not report it).
    let phase_at = |o: &Ours, name: &str, q: fn(&PhaseRow) -> Option<f64>| {
        o.rows
            .iter()
            .find(|r| r.phase == name)
            .and_then(q)
            .unwrap_or(f64::NAN)
    };
    let phase = |o: &Ours, name: &str| phase_at(o, name, |r| r.p50);
    let phase99 = |o: &Ours, name: &str| phase_at(o, name, |r| r.p99);
    // The mean time outside the agent's answer (NaN without the answer histogram).
    let outside = |o: &Ours| {
        mean(&o.times) - tmean - o.answer.as_ref().and_then(|a| a.mean).unwrap_or(f64::NAN)
    };
    if n50 - t50 > 1.0 || n99 - t99 > 2.5 {
        println!(
            "- nftables target NOT met. ztunnel's ack is {:.2} ms at p50 in our ADD and {zds_alone:.2} ms \
             measured alone (Istio's path above: our own ZDS peer, no agent): stock ztunnel's work \
             on AddWorkload, paid by any CNI. The rules are {:.2} ms in our ADD and {nft_alone:.2} ms \
             measured alone (a thread entering a fresh netns + one nf_tables transaction for IPv4 \
             and IPv6 + one route datagram; two netlink families, so two round trips). Those two \
             alone are {:.2} ms of the 1.0 ms allowed; with the netns and record phases ({:.2} ms) \
             and the plugin's round trip to an idle agent (about 0.2 ms over /bin/true, \
             `plugin_add`), this path's floor is {:.2} ms over /bin/true with stock ztunnel on \
             this kernel. Outside the agent's answer (means above) lie {:.2} ms ({:.2} ms \
             with the stand-in, {:.2} ms with the API server, etcd and controller manager at \
             SCHED_IDLE), where the plugin's round trip costs about 0.2 ms; `agent_enroll` shows \
             the same split for the local source. On the kube source the agent also writes each pod's status and takes the watch event \
             that echoes it back: its CPU per ADD is {:.2} ms here (`agent_enroll` prints the \
             local source's). Those writes start 10 ms after their ADD (started at once, they \
             added about 0.9 ms to it); in back-to-back ADDs they land beside a later one. The \
             cluster's own CPU ({:.2} ms per ADD) is not what the ADD waits for: idling it does \
             not shorten the ADD. The p99 follows ztunnel's ack: {:.2} ms at p99 in our ADD and \
             {:.2} ms measured alone on Istio's path (our rules' p99: {:.2} ms), on a shared \
             machine (1-minute load in the section header).",
            phase(&nft, "ztunnel"),
            phase(&nft, "rules"),
            zds_alone + nft_alone,
            phase(&nft, "netns") + phase(&nft, "record"),
            zds_alone + nft_alone + phase(&nft, "netns") + phase(&nft, "record") + 0.2,
            outside(&nft),
            outside(&standin),
            outside(&yielding),
            nft.agent_cpu_per_add,
            nft.cluster_cpu_per_add,
            phase99(&nft, "ztunnel"),
            pct(&steps[4].1, 99),
            phase99(&nft, "rules"),
        );
    }
    if pct(&ipt.times, 50) > 4.0 {
        println!(
            "- iptables target NOT met: its rules phase is {:.2} ms at p50, and {ipt_alone:.2} ms \
             measured alone: with IPv6 on, one `iptables-restore` exec per family (a fresh pod's \
             `*-save` is skipped; running both families at once was slower here: iptables-nft \
             commits serialise per netns and retry on a changed generation). Each exec is a \
             dynamically linked binary that loads its extensions and reads the netns' ruleset \
             before it commits; the iptables backend exists to run exactly those binaries, so \
             this is its floor. IPv4 only (one exec): rules {:.2} ms, ADD {:.2} ms at p50 ({}); \
             the nftables backend (the default) does the same work in one netlink transaction.",
            phase(&ipt, "rules"),
            phase(&ipt4, "rules"),
            pct(&ipt4.times, 50),
            if pct(&ipt4.times, 50) <= 4.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if i50 / n50 < 10.0 {
        println!(
            "- ratio to Istio's path NOT met: Istio's path is {i50:.2} ms here, so 10x needs ours at \
             {:.2} ms; the exec floor and ztunnel's ack measured alone, which both paths pay, are \
             {:.2} ms of that, and our rules alone {nft_alone:.2} ms more.",
            i50 / 10.0,
            t50 + zds_alone
        );
    }
    drop(c);
    drop(kube);
}
