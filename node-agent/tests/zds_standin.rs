//! The ZDS server against the ztunnel stand-in binary (a separate ZDS client
//! that opens ztunnel's ports inside each pod netns). Needs root (netns,
//! SO_MARK) and the binary: `cargo build -p ambient-cni-tests --bin ztunnel-standin`
//! (or `ZTUNNEL_STANDIN_BIN`); skips otherwise, fails when `CI` is set.

mod zds_support;

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_cni_agent::inpod::zds::{
    SnapshotEntry, SnapshotSource, ZdsConfig, ZdsError, ZdsServer,
};
use ambient_cni_api::zds::{socket as zds_socket, WorkloadInfo};
use iptables_rules::netns::Netns;
use serde_json::Value;
use tokio::sync::mpsc;
use zds_support::{cleanup, eventually, sock_path};

fn standin_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZTUNNEL_STANDIN_BIN") {
        return Some(PathBuf::from(p));
    }
    // <target>/debug/deps/zds_standin-<hash> → <target>/debug/ztunnel-standin
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("ztunnel-standin");
    p.exists().then_some(p)
}

/// Root and the stand-in binary, or a skip message (a failure under CI).
fn prerequisites() -> Option<PathBuf> {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (netns, SO_MARK)".to_owned()
    } else if let Some(b) = standin_bin() {
        return Some(b);
    } else {
        "ztunnel-standin not built: run `cargo build -p ambient-cni-tests --bin ztunnel-standin` \
         with the same CARGO_TARGET_DIR, or set ZTUNNEL_STANDIN_BIN"
            .to_owned()
    };
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

#[derive(Default)]
struct State(Mutex<Vec<SnapshotEntry>>);

impl SnapshotSource for State {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.0.lock().unwrap().clone()
    }
}

/// Named netns made with `ip netns add`, deleted on drop (also on failure).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new() -> Self {
        Namespaces(vec![])
    }

    fn add(&mut self, name: &str) -> Arc<Netns> {
        let st = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        self.0.push(name.to_owned());
        let st = Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        Arc::new(Netns::open(&Path::new("/run/netns").join(name), None).unwrap())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// The running stand-in and its JSON events.
struct Standin {
    child: Child,
    events: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Standin {
    fn start(bin: &Path, socket: &Path, extra: &[&str]) -> Standin {
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .args(["--max-backoff-ms", "50"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Standin {
            child,
            events,
            seen: vec![],
        }
    }

    /// Waits for the next event named `name` (others are kept in `seen`).
    async fn wait(&mut self, name: &str) -> Value {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {name} event; seen: {:?}", self.seen))
                .unwrap_or_else(|| panic!("stand-in exited; seen: {:?}", self.seen));
            self.seen.push(ev.clone());
            if ev["event"] == name {
                return ev;
            }
        }
    }

    fn seen(&self, name: &str) -> Vec<&Value> {
        self.seen.iter().filter(|e| e["event"] == name).collect()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "demo".into(),
        service_account: format!("sa-{name}"),
    }
}

fn cfg() -> ZdsConfig {
    ZdsConfig {
        ack_timeout: Duration::from_millis(800),
        accept_interval: Duration::from_millis(1),
        ..ZdsConfig::default()
    }
}

fn tag() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}", std::process::id() ^ n)
}

/// Connects to 127.0.0.1:`port` inside `ns`; the stand-in's answer line, or the error.
fn talk(ns: &Netns, port: u16) -> Result<String, std::io::Error> {
    ns.run(|| {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        s.read_to_string(&mut line)?;
        Ok(line)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_twenty_pods_with_their_netns() {
    let Some(bin) = prerequisites() else { return };
    let t = tag();
    let mut nss = Namespaces::new();
    let state = Arc::new(State::default());
    let mut want = std::collections::HashMap::new();
    for i in 0..20 {
        let netns = (i < 18).then(|| nss.add(&format!("zsi-{t}-{i}")));
        if let Some(ns) = &netns {
            want.insert(format!("uid-{i}"), ns.id().ino);
        }
        state.0.lock().unwrap().push(SnapshotEntry {
            uid: format!("uid-{i}"),
            info: info(&format!("pod{i}")),
            netns,
        });
    }
    let path = sock_path("standin-snap");
    let srv = ZdsServer::bind_with(&path, state.clone(), cfg()).unwrap();
    let mut zt = Standin::start(&bin, &path, &["--exit-on-second-snapshot"]);
    let done = zt.wait("snapshot_sent").await;
    assert_eq!(done["adds"], 18);
    assert_eq!(done["keeps"], 2);
    let adds = zt.seen("add");
    assert_eq!(adds.len(), 18);
    for a in adds {
        let uid = a["uid"].as_str().unwrap();
        assert_eq!(a["netns_inode"], want[uid], "{a}");
        assert_eq!(a["result"], "started");
        assert_eq!(a["namespace"], "demo");
        assert_eq!(
            a["service_account"],
            format!("sa-{}", a["name"].as_str().unwrap())
        );
    }
    assert_eq!(zt.seen("keep").len(), 2);
    // ztunnel's ports are open inside a pod's netns, and answer.
    let ns3 = state.0.lock().unwrap()[3].netns.clone().unwrap();
    for port in [15001, 15006, 15008, 15053] {
        let line = talk(&ns3, port).unwrap();
        assert!(line.starts_with(&format!("standin port={port} ")), "{line}");
    }
    let acc = zt.wait("accepted").await;
    assert_eq!(acc["uid"], "uid-3");
    // Still connected: one SnapshotSent only (a second would make it exit).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(zt.child.try_wait().unwrap().is_none(), "stand-in exited");
    srv.shutdown().await;
    zt.wait("disconnected").await;
    cleanup(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_adds_dels_nacks_and_restart() {
    let Some(bin) = prerequisites() else { return };
    let t = tag();
    let mut nss = Namespaces::new();
    let (a1, a2, b) = (
        nss.add(&format!("zss-{t}-a1")),
        nss.add(&format!("zss-{t}-a2")),
        nss.add(&format!("zss-{t}-b")),
    );
    let state = Arc::new(State::default());
    let path = sock_path("standin-steady");
    let srv = ZdsServer::bind_with(&path, state.clone(), cfg()).unwrap();
    let mut zt = Standin::start(&bin, &path, &["--nack-uid-prefix", "bad-", "--no-dns"]);
    zt.wait("snapshot_sent").await;

    srv.add_workload("pod-a", info("a"), &a1).await.unwrap();
    assert_eq!(zt.wait("add").await["result"], "started");
    assert!(talk(&a1, 15006).unwrap().starts_with("standin port=15006"));
    assert!(talk(&a1, 15053).is_err(), "--no-dns");
    srv.add_workload("pod-a", info("a"), &a1).await.unwrap();
    assert_eq!(zt.wait("add").await["result"], "noop");
    srv.add_workload("pod-a", info("a"), &a2).await.unwrap();
    assert_eq!(zt.wait("add").await["result"], "replaced");
    assert!(talk(&a1, 15001).is_err(), "old netns released");
    assert!(talk(&a2, 15001).is_ok());

    let err = srv
        .add_workload("bad-1", info("bad"), &b)
        .await
        .unwrap_err();
    assert!(matches!(err, ZdsError::Nack(_)), "{err}");
    assert!(err.to_string().starts_with("got ack error: "), "{err}");

    srv.add_workload("pod-b", info("b"), &b).await.unwrap();
    srv.del_workload("pod-b").await.unwrap();
    let del = zt.wait("del").await;
    assert_eq!(
        (del["uid"].as_str(), del["existed"].as_bool()),
        (Some("pod-b"), Some(true))
    );
    assert!(talk(&b, 15001).is_err(), "listeners closed on delete");

    // Agent restart: the stand-in keeps its proxies, reconnects, and the new
    // snapshot (pod-a only, same netns) drains nothing but what it omits.
    srv.shutdown().await;
    drop(srv);
    zt.wait("disconnected").await;
    srv_restart_snapshot(&state, &a2);
    let srv = ZdsServer::bind_with(&path, state.clone(), cfg()).unwrap();
    zt.wait("connected").await;
    let add = zt.wait("add").await;
    assert_eq!(
        (add["uid"].as_str(), add["result"].as_str()),
        (Some("pod-a"), Some("noop"))
    );
    zt.wait("snapshot_sent").await;
    assert!(talk(&a2, 15001).is_ok(), "proxy kept across the restart");
    eventually(Duration::from_secs(2), "registered", || {
        srv.connections() == 1
    })
    .await;
    srv.shutdown().await;
    cleanup(&path);
}

fn srv_restart_snapshot(state: &State, a2: &Arc<Netns>) {
    *state.0.lock().unwrap() = vec![SnapshotEntry {
        uid: "pod-a".into(),
        info: info("a"),
        netns: Some(a2.clone()),
    }];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_standin_times_out() {
    let Some(bin) = prerequisites() else { return };
    let t = tag();
    let mut nss = Namespaces::new();
    let ns = nss.add(&format!("zst-{t}"));
    let path = sock_path("standin-stall");
    let srv = ZdsServer::bind_with(&path, Arc::new(State::default()), cfg()).unwrap();
    let mut zt = Standin::start(&bin, &path, &["--stall-after", "1"]);
    zt.wait("snapshot_sent").await;
    zt.wait("stalled").await;
    let start = std::time::Instant::now();
    let err = srv.add_workload("p", info("p"), &ns).await.unwrap_err();
    assert!(matches!(err, ZdsError::Timeout { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    srv.shutdown().await;
    cleanup(&path);
}

/// A bare SEQPACKET server for checking the stand-in's own strictness.
fn raw_server(path: &Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(8).unwrap()).unwrap();
    fd
}

fn raw_accept(l: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd};
    let raw = nix::sys::socket::accept(l.as_raw_fd()).unwrap();
    let c = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let mut buf = [0u8; 1024];
    let got = zds_socket::recv(c.as_fd(), &mut buf).unwrap();
    assert!(matches!(got, zds_socket::Recv::Packet(_)), "hello");
    c
}

fn raw_exchange(c: &std::os::fd::OwnedFd, req: &ambient_cni_api::zds::WorkloadRequest) -> String {
    use ambient_cni_api::zds::{workload_response::Payload, WorkloadResponse};
    use prost::Message;
    use std::os::fd::AsFd;
    zds_socket::send(c.as_fd(), &req.encode_to_vec(), None).unwrap();
    let mut buf = [0u8; 1024];
    let zds_socket::Recv::Packet(n) = zds_socket::recv(c.as_fd(), &mut buf).unwrap() else {
        panic!("no ack: connection closed")
    };
    match WorkloadResponse::decode(&buf[..n]).unwrap().payload {
        Some(Payload::Ack(a)) => a.error,
        None => panic!("no ack"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_is_as_strict_as_ztunnel() {
    use ambient_cni_api::zds::{
        workload_request::Payload, AddWorkload, SnapshotSent, WorkloadRequest,
    };
    let Some(bin) = prerequisites() else { return };
    let path = sock_path("standin-strict");
    let l = raw_server(&path);
    let mut zt = Standin::start(&bin, &path, &[]);
    let c = raw_accept(&l);
    // AddWorkload without an fd: nacked, connection dropped, reconnect.
    let add = WorkloadRequest {
        payload: Some(Payload::Add(AddWorkload {
            uid: "u".into(),
            workload_info: Some(info("u")),
        })),
    };
    assert_eq!(raw_exchange(&c, &add), "No control message");
    zt.wait("disconnected").await;
    drop(c);
    let c = raw_accept(&l);
    let done = WorkloadRequest {
        payload: Some(Payload::SnapshotSent(SnapshotSent {})),
    };
    assert_eq!(raw_exchange(&c, &done), "");
    // A second SnapshotSent: the process exits like ztunnel.
    zds_socket::send(
        std::os::fd::AsFd::as_fd(&c),
        &prost::Message::encode_to_vec(&done),
        None,
    )
    .unwrap();
    zt.wait("protocol_mismatch").await;
    let status = zt.child.wait().unwrap();
    assert_eq!(status.code(), Some(2));
    cleanup(&path);
}
