//! The real peers of `../shared/peers/README.md` for integration tests: stock ztunnel
//! (`ZTUNNEL_BIN`) in a netns of its own, the real kube-apiserver (`KUBECONFIG` +
//! `KUBE_PEER_DIR`), and the probes tests use on them (listeners with their inode and
//! owner, HTTP inside a netns, TCP servers inside a netns).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iptables_rules::netns::Netns;
use serde_json::Value;

use crate::{agent_bin, wait_for, AgentProcess, NamedNetns};

/// Where the peers are described (named in every skip message).
pub const PEERS_README: &str = "../shared/peers/README.md";

/// Agent flags that move its health and metrics ports (host netns, :8000 and :15014 by
/// default) to ephemeral loopback ports, so agents of parallel tests do not collide.
pub const EPHEMERAL_PORTS: [&str; 4] = [
    "--health-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
];

/// Says a test is skipped for `why`, or panics when `CI` is set (CI provides every peer).
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why}, and CI is set (see {PEERS_README})"
    );
    eprintln!("skipped {test}: {why} (see {PEERS_README})");
}

/// `ZTUNNEL_BIN` when set (and running as root); else skips (`None`) or fails under `CI`.
pub fn ztunnel_bin(test: &str) -> Option<PathBuf> {
    if !crate::require_root(test) {
        return None;
    }
    match std::env::var_os("ZTUNNEL_BIN").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.exists(), "ZTUNNEL_BIN={} does not exist", p.display());
            Some(p)
        }
        None => {
            skip(
                test,
                "ZTUNNEL_BIN is unset (`../shared/peers/ztunnel.sh | tail -1` prints it)",
            );
            None
        }
    }
}

/// The running kube-apiserver peer's variables.
#[derive(Debug, Clone)]
pub struct KubePeer {
    /// Admin kubeconfig (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// The instance directory (`KUBE_PEER_DIR`).
    pub dir: PathBuf,
}

impl KubePeer {
    /// Path of a kubeconfig that is ServiceAccount `ns/sa` (a TokenRequest token).
    pub fn kubeconfig_for(&self, ns: &str, sa: &str) -> Result<PathBuf, String> {
        let out = Command::new(self.dir.join("kubeconfig-for"))
            .args([ns, sa])
            .output()
            .map_err(|e| format!("exec {}/kubeconfig-for: {e}", self.dir.display()))?;
        if !out.status.success() {
            return Err(format!(
                "kubeconfig-for {ns} {sa}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .map(|l| PathBuf::from(l.trim()))
            .filter(|p| p.exists())
            .ok_or_else(|| "kubeconfig-for printed no existing path".to_owned())
    }
}

/// `KUBECONFIG` + `KUBE_PEER_DIR` when both are set (and root); else skips or fails under `CI`.
pub fn kube_peer(test: &str) -> Option<KubePeer> {
    if !crate::require_root(test) {
        return None;
    }
    let kc = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
    let dir = std::env::var_os("KUBE_PEER_DIR").filter(|v| !v.is_empty());
    match (kc, dir) {
        (Some(k), Some(d)) => Some(KubePeer {
            kubeconfig: k.into(),
            dir: d.into(),
        }),
        _ => {
            skip(
                test,
                "KUBECONFIG and/or KUBE_PEER_DIR are unset (`../shared/peers/kube.sh start` prints both)",
            );
            None
        }
    }
}

/// One workload of ztunnel's local xDS file, matched by (namespace, serviceAccount, name).
#[derive(Debug, Clone)]
pub struct XdsWorkload {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The pod's `spec.serviceAccountName`.
    pub service_account: String,
}

impl XdsWorkload {
    /// A workload entry.
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
        }
    }
}

/// ztunnel's `LOCAL_XDS_PATH` YAML for `workloads` (JSON is YAML: no quoting pitfalls).
pub fn xds_yaml(workloads: &[XdsWorkload]) -> String {
    let list: Vec<Value> = workloads
        .iter()
        .map(|w| {
            serde_json::json!({
                "uid": format!("Kubernetes//Pod/{}/{}", w.namespace, w.name),
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "workloadIps": [],
                "protocol": "HBONE",
                "services": {},
            })
        })
        .collect();
    serde_json::json!({ "workloads": list }).to_string()
}

/// Stock ztunnel (shared proxy mode, fake CA, local xDS only) in a netns of its own;
/// killed and its netns deleted on drop.
#[derive(Debug)]
pub struct Ztunnel {
    netns: NamedNetns,
    child: Child,
    log: PathBuf,
    /// `/etc/netns/<its netns>` when [`Ztunnel::start_with`] gave it a resolv.conf; removed on drop.
    etc_dir: Option<PathBuf>,
}

/// Options of [`Ztunnel::start_with`] beyond [`Ztunnel::start`]'s.
#[derive(Debug, Clone, Default)]
pub struct ZtunnelOptions {
    /// `RUST_LOG` (default `info`), e.g. `info,dns=debug` for its DNS proxy's access log.
    pub rust_log: Option<String>,
    /// Content of the resolv.conf ztunnel sees (its DNS proxy's upstream resolvers), bind
    /// mounted by `ip netns exec` from `/etc/netns/<its netns>/resolv.conf`; default: the host's.
    pub resolv_conf: Option<String>,
}

impl Ztunnel {
    /// Starts `bin` as the ZDS client of `socket`, reading `xds` (written before), logging to `log`.
    pub fn start(bin: &Path, socket: &Path, xds: &Path, log: &Path) -> Self {
        Self::start_with(bin, socket, xds, log, &ZtunnelOptions::default())
    }

    /// [`Ztunnel::start`] with `opts`.
    pub fn start_with(
        bin: &Path,
        socket: &Path,
        xds: &Path,
        log: &Path,
        opts: &ZtunnelOptions,
    ) -> Self {
        let netns = NamedNetns::new();
        let etc_dir = opts.resolv_conf.as_ref().map(|text| {
            let d = PathBuf::from("/etc/netns").join(netns.name());
            std::fs::create_dir_all(&d).expect("/etc/netns dir");
            std::fs::write(d.join("resolv.conf"), text).expect("ztunnel resolv.conf");
            d
        });
        let rust_log = opts.rust_log.as_deref().unwrap_or("info");
        let logf = std::fs::File::create(log).expect("ztunnel log file");
        // `ip netns exec` and `env` exec, so the child's pid is ztunnel's own.
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name(), "env", "-i"])
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("PROXY_MODE=shared")
            .arg(format!("INPOD_UDS={}", socket.display()))
            .arg("FAKE_CA=true")
            .arg("XDS_ADDRESS=")
            .arg(format!("LOCAL_XDS_PATH={}", xds.display()))
            .arg(format!("RUST_LOG={rust_log}"))
            .arg(bin)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .expect("spawn ztunnel");
        Self {
            netns,
            child,
            log: log.to_owned(),
            etc_dir,
        }
    }

    /// ztunnel's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its own netns.
    pub fn netns(&self) -> &NamedNetns {
        &self.netns
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /healthz/ready` on :15021 answers 200 (it has our snapshot).
    pub fn ready(&self) -> bool {
        http_get(&self.netns, 15021, "/healthz/ready").is_some_and(|(code, _)| code == 200)
    }

    /// Waits until ready.
    pub fn wait_ready(&self, limit: Duration) -> bool {
        wait_for(limit, || self.ready())
    }

    /// Its admin `config_dump` (127.0.0.1:15000).
    pub fn config_dump(&self) -> Option<Value> {
        let (code, body) = http_get(&self.netns, 15000, "/config_dump")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The in-pod proxies it runs: `workloadState` of `config_dump`, uid → state (`Up`/`Pending`).
    pub fn workload_states(&self) -> Option<BTreeMap<String, String>> {
        let dump = self.config_dump()?;
        let states = dump.get("workloadState")?.as_object()?;
        Some(
            states
                .iter()
                .map(|(uid, v)| {
                    let st = v["state"].as_str().unwrap_or_default().to_owned();
                    (uid.clone(), st)
                })
                .collect(),
        )
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// SIGKILLs it and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = self.etc_dir.take() {
            let _ = std::fs::remove_dir_all(d);
            // `/etc/netns` itself only if this left it empty (other netns may use it).
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// An HTTP/1.0 GET to 127.0.0.1:`port` inside `ns`: (status, body), `None` if unreachable.
pub fn http_get(ns: &NamedNetns, port: u16, path: &str) -> Option<(u16, String)> {
    let h = Netns::open(Path::new(&ns.path()), None).ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let text = h
        .run(move || -> std::io::Result<String> {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(req.as_bytes())?;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            Ok(String::from_utf8_lossy(&out).into_owned())
        })
        .ok()?
        .ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// One listening TCP socket in a netns, as `ss -Hltnpe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Local address as printed (e.g. `0.0.0.0:15001`, `127.0.0.1:15053`).
    pub local: String,
    /// The port.
    pub port: u16,
    /// The socket's inode (`ino:`): the same socket across observations.
    pub inode: u64,
    /// Pids of the processes holding it.
    pub pids: Vec<u32>,
}

/// The TCP listeners in `ns`.
pub fn listeners(ns: &NamedNetns) -> Vec<Listener> {
    let out = ns.exec(&["ss", "-Hltnpe"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_ss_line)
        .collect()
}

/// Parses one `ss -Hltnpe` line.
fn parse_ss_line(line: &str) -> Option<Listener> {
    let local = line.split_whitespace().nth(3)?.to_owned();
    let port = local.rsplit(':').next()?.parse().ok()?;
    let inode = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ino:"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pids = line
        .split("pid=")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    Some(Listener {
        local,
        port,
        inode,
        pids,
    })
}

/// The sorted, distinct listening ports in `ns`.
pub fn listening_ports(ns: &NamedNetns) -> Vec<u16> {
    let mut p: Vec<u16> = listeners(ns).iter().map(|l| l.port).collect();
    p.sort();
    p.dedup();
    p
}

/// Pids holding a listener on `port` in `ns`.
pub fn port_owners(ns: &NamedNetns, port: u16) -> Vec<u32> {
    let mut p: Vec<u32> = listeners(ns)
        .into_iter()
        .filter(|l| l.port == port)
        .flat_map(|l| l.pids)
        .collect();
    p.sort();
    p.dedup();
    p
}

/// A TCP server inside a netns: answers every connection with `peer=<its address>\n`
/// and remembers the peers. Stopped on drop.
#[derive(Debug)]
pub struct PeerEchoServer {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerEchoServer {
    /// Listens on 0.0.0.0:`port` inside `ns` (the socket is made there; served from a host thread).
    pub fn start(ns: &NamedNetns, port: u16) -> Self {
        let h = Netns::open(Path::new(&ns.path()), None).expect("open server netns");
        let listener = h
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .expect("enter server netns")
            .expect("bind server");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        p.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.write_all(format!("peer={peer}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            peers,
            thread: Some(thread),
        }
    }

    /// Peers seen so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for PeerEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `to`; returns (our local address, the first line the server says).
pub fn connect_from(ns: &NamedNetns, to: &str) -> Result<(SocketAddr, String), String> {
    exchange_from(ns, to, None, Duration::from_secs(3))
}

/// An HTTP/1.0 `GET /` from inside `ns` to `to`: (our local address, the whole response).
pub fn http_get_from(ns: &NamedNetns, to: &str) -> Result<(SocketAddr, String), String> {
    exchange_from(
        ns,
        to,
        Some(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n"),
        Duration::from_secs(5),
    )
}

/// Connects from inside `ns` to `to`, sends `request` if any, and reads the first line (no
/// request) or everything until the server closes (a request).
fn exchange_from(
    ns: &NamedNetns,
    to: &str,
    request: Option<&'static [u8]>,
    read_timeout: Duration,
) -> Result<(SocketAddr, String), String> {
    let h = Netns::open(Path::new(&ns.path()), None).map_err(|e| e.to_string())?;
    let to: SocketAddr = to.parse().map_err(|e| format!("{to}: {e}"))?;
    h.run(move || -> Result<(SocketAddr, String), String> {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(read_timeout))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        if let Some(req) = request {
            s.write_all(req).map_err(|e| e.to_string())?;
            s.read_to_end(&mut buf)
                .map_err(|e| format!("read from {to}: {e}"))?;
            return Ok((local, String::from_utf8_lossy(&buf).into_owned()));
        }
        let mut chunk = [0u8; 256];
        // Read until the line ends (or EOF/timeout): the proxy may deliver it in pieces.
        while !buf.contains(&b'\n') {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read from {to}: {e}")),
            }
        }
        Ok((local, String::from_utf8_lossy(&buf).trim().to_owned()))
    })
    .map_err(|e| e.to_string())?
}

/// Writes a copy of `kubeconfig` to `out` whose clusters point at `server` (e.g. a [`TcpGate`]):
/// TLS still verifies, the certificate names the IP and not the port.
pub fn kubeconfig_via(kubeconfig: &Path, server: &str, out: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| format!("read {}: {e}", kubeconfig.display()))?;
    let mut v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| format!("parse {}: {e}", kubeconfig.display()))?;
    let clusters = v
        .get_mut("clusters")
        .and_then(|c| c.as_sequence_mut())
        .ok_or_else(|| format!("{}: no clusters", kubeconfig.display()))?;
    for c in clusters {
        if let Some(cluster) = c.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
            cluster.insert("server".into(), server.into());
        }
    }
    let text = serde_yaml_ng::to_string(&v).map_err(|e| e.to_string())?;
    std::fs::write(out, text).map_err(|e| format!("write {}: {e}", out.display()))
}

/// A TCP forwarder on 127.0.0.1 that can be switched off (connections refused, open ones
/// cut) and on again at the same port: "the API server is down" without touching the
/// shared API server instance.
pub struct TcpGate {
    addr: SocketAddr,
    upstream: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
    run: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for TcpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGate")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl TcpGate {
    /// Opens a gate to `upstream` on a free port of 127.0.0.1.
    pub fn open(upstream: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("gate runtime");
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let me = Self {
            addr,
            upstream,
            rt: Some(rt),
            run: Mutex::new(Vec::new()),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        me.on();
        me
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("gate runtime")
    }

    /// Accepts and forwards again (same port).
    pub fn on(&self) {
        let (addr, upstream, conns) = (self.addr, self.upstream, self.conns.clone());
        let listener = self.rt().block_on(async move {
            let mut last = None;
            for _ in 0..100 {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => return l,
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("rebind {addr}: {last:?}");
        });
        let task = self.rt().spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let t = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                conns.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
        });
        self.run
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Stops listening (new connections are refused) and cuts every forwarded connection.
    pub fn off(&self) {
        for t in self.run.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
        for t in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        // Wait until the port really refuses (aborted tasks drop their sockets asynchronously).
        let addr = self.addr;
        wait_for(Duration::from_secs(5), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
        });
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Also fine inside an async test (no blocking drop).
            rt.shutdown_background();
        }
    }
}

impl AgentProcess {
    /// Starts `ambient-cni-agent run` under `dir` with the Kubernetes pod source, as node
    /// `node`, authenticating with `kubeconfig`; `extra` flags appended. Waits until ready.
    pub fn start_kube(dir: &Path, kubeconfig: &Path, node: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("agent dir");
        let log = dir.join("agent.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("agent ready")
            .count();
        let socket = dir.join("plugin.sock");
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--agent-socket")
            .arg(&socket)
            .arg("--ztunnel-uds-address")
            .arg(dir.join("ztunnel.sock"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["--pod-source", "kube"])
            // The installer stays off unless `extra` turns it on.
            .args(if extra.iter().any(|a| a.starts_with("--install-cni")) {
                &[][..]
            } else {
                &["--install-cni=false"][..]
            })
            // Defaults a flag in `extra` replaces (clap refuses a flag given twice).
            .args(if extra.contains(&"--log-level") {
                &[][..]
            } else {
                &["--log-level", "info,ambient_cni_agent=debug"][..]
            })
            .args(
                EPHEMERAL_PORTS
                    .chunks(2)
                    .filter(|kv| !extra.contains(&kv[0]))
                    .flatten(),
            )
            .args(extra)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", node)
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .expect("spawn agent");
        let mut me = Self {
            child,
            dir: dir.to_owned(),
            socket,
            log,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            me.log_text().matches("agent ready").count() > before
        });
        if !ready {
            me.kill();
            panic!("agent did not become ready; log:\n{}", me.log_text());
        }
        me
    }
}

/// A client of a real kube-apiserver peer (or the node's) from its kubeconfig file.
pub async fn kube_client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await?;
    Ok(kube::Client::try_from(cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_line_parsed() {
        let l = "LISTEN 0 128 0.0.0.0:15001 0.0.0.0:* users:((\"ztunnel\",pid=4242,fd=31),(\"ztunnel\",pid=77,fd=9)) ino:123456 sk:1 cgroup:/ <->";
        let got = parse_ss_line(l).expect("parsed");
        assert_eq!(got.port, 15001);
        assert_eq!(got.inode, 123456);
        assert_eq!(got.pids, vec![4242, 77]);
        assert_eq!(got.local, "0.0.0.0:15001");
        let v6 = "LISTEN 0 128 [::]:15008 [::]:* ino:9 sk:2";
        assert_eq!(parse_ss_line(v6).map(|l| l.port), Some(15008));
    }

    #[test]
    fn xds_is_yaml_with_the_required_keys() {
        let y = xds_yaml(&[XdsWorkload::new("mesh", "web", "sa-web")]);
        let v: Value = serde_json::from_str(&y).expect("json");
        let w = &v["workloads"][0];
        assert_eq!(w["serviceAccount"], "sa-web");
        assert_eq!(w["workloadIps"], serde_json::json!([]));
        assert_eq!(w["services"], serde_json::json!({}));
    }
}
