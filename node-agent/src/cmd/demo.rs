//! `ambient-cni-agent demo`: the local demo of the README, on a plain Linux host.
//!
//! Network namespaces play the pods; Debian's `bridge` + `host-local` and our
//! `ambient-cni` plugin are exec'd exactly as a runtime does (`CNI_*` env +
//! stdin, `prevResult` chaining); the agent runs with a local pod source and a
//! ztunnel stand-in takes the pods over ZDS. The demo shows each pod captured,
//! its traffic arriving at the stand-in with the original destination, a pod
//! released by relabelling going direct, and then removes everything it made
//! (also on Ctrl-C and on errors).

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use iptables_rules::config::InpodConfig;
use iptables_rules::netns::{Netns, NsId};
use iptables_rules::redirector::Redirector;
use serde_json::{json, Value};

use crate::cli::{BackendChoice, Cli, Command as AgentCommand};
use crate::obs::{expo, http};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
const CNI_DIR: &str = "/usr/lib/cni";
/// The CNI version the chain runs at (Debian 12's plugins speak up to 1.0.0).
const CNI_VERSION: &str = "1.0.0";
/// The demo pods' namespace (labelled for ambient).
const NAMESPACE: &str = "demo";
/// The port the peer listens on.
const PEER_PORT: u16 = 8080;
/// PATH for every child: the tools the agent and plugins exec live here.
const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long one plugin exec may take.
const EXEC_LIMIT: Duration = Duration::from_secs(20);
/// Connect/read limit for demo traffic.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(3);

/// Flags of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The `ambient-cni` plugin binary [default: `ambient-cni` next to this binary].
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The ztunnel stand-in binary [default: `ztunnel-standin` next to this binary].
    #[arg(long)]
    pub standin: Option<PathBuf>,
    /// In-pod rules backend the agent uses.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Number of pods.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub pods: u8,
    /// Leave everything running at the end (prints how to remove it).
    #[arg(long)]
    pub keep: bool,
    /// The demo bridge's IPv4 subnet (a /24 not routed on this host).
    #[arg(long, default_value = "10.200.0.0/24")]
    pub subnet: String,
}

// ---------------------------------------------------------------- interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe. The steps poll the flag.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("cannot handle {sig}"))?;
    }
    Ok(())
}

/// Fails once Ctrl-C (or SIGTERM) arrived, so the steps unwind into cleanup.
fn checkpoint() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `cond` every 50 ms until it holds, `limit` passes, or the user interrupts.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        checkpoint()?;
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- output

fn heading(n: usize, title: &str) {
    println!("\n== {n}. {title}");
}

/// A table printed with aligned columns.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Self {
        Self {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let mut widths: Vec<usize> = self.head.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::from("  ");
            for (i, c) in cells.iter().enumerate() {
                let last = i + 1 == cells.len();
                if last {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            println!("{}", s.trim_end());
        };
        line(self.head.clone());
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect());
        }
        let _ = std::io::stdout().flush();
    }
}

// ---------------------------------------------------------------- commands

/// Runs a host command (argv, never a shell); the error names the command and its stderr.
fn cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn on_path(name: &str) -> Option<PathBuf> {
    CHILD_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// ---------------------------------------------------------------- the CNI chain

/// One container a chain ran for.
#[derive(Debug, Clone)]
struct Attachment {
    container_id: String,
    netns_path: String,
    args: String,
}

/// A conflist run the way libcni runs it.
#[derive(Debug, Clone)]
struct Chain {
    /// The list's `name`.
    name: String,
    /// The list's `cniVersion`.
    version: String,
    /// The plugin entries, in order.
    plugins: Vec<Value>,
    /// `CNI_PATH`: plugin binaries are looked up by `type` here, in order.
    path: Vec<PathBuf>,
}

/// What one plugin exec printed.
struct Exec {
    stdout: String,
    stderr: String,
    code: i32,
}

impl Chain {
    /// Loads a conflist file.
    fn load(file: &Path, path: Vec<PathBuf>) -> Result<Self> {
        let text = fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
        let plugins = v["plugins"]
            .as_array()
            .cloned()
            .with_context(|| format!("{}: no plugins list", file.display()))?;
        Ok(Self {
            name: v["name"].as_str().unwrap_or_default().to_owned(),
            version: v["cniVersion"].as_str().unwrap_or(CNI_VERSION).to_owned(),
            plugins,
            path,
        })
    }

    /// The plugin types, in order.
    fn types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect()
    }

    /// The chain for humans: `bridge (host-local IPAM) -> ambient-cni`.
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .plugins
            .iter()
            .map(|p| {
                let ty = p["type"].as_str().unwrap_or("?");
                match p["ipam"]["type"].as_str() {
                    Some(ipam) => format!("{ty} ({ipam} IPAM)"),
                    None => ty.to_owned(),
                }
            })
            .collect();
        parts.join(" -> ")
    }

    fn binary(&self, ty: &str) -> Result<PathBuf> {
        self.path
            .iter()
            .map(|d| d.join(ty))
            .find(|p| executable(p))
            .with_context(|| format!("CNI plugin {ty:?} not found in {:?}", self.path))
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Exec> {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let mut conf = plugin.clone();
        conf["name"] = self.name.clone().into();
        conf["cniVersion"] = self.version.clone().into();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let cni_path = self
            .path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let bin = self.binary(ty)?;
        let mut child = Command::new(&bin)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &att.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: Ctrl-C reaches the demo only, which then cleans up in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot exec CNI plugin {}", bin.display()))?;
        let input = conf.to_string();
        let mut stdin = child.stdin.take().context("plugin stdin")?;
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let mut stdout = child.stdout.take().context("plugin stdout")?;
        let mut stderr = child.stderr.take().context("plugin stderr")?;
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + EXEC_LIMIT;
        let code = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st.code().unwrap_or(-1),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break -1;
                }
            }
        };
        let _ = writer.join();
        Ok(Exec {
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
            code,
        })
    }

    /// ADD through the list; the final result, or an error naming the failing plugin.
    fn add(&self, att: &Attachment) -> Result<Value, ChainError> {
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
            let out = self
                .exec("ADD", plugin, att, prev.as_ref())
                .map_err(|e| ChainError {
                    plugin: ty.clone(),
                    code: None,
                    msg: format!("{e:#}"),
                })?;
            if out.code != 0 {
                let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
                return Err(ChainError {
                    plugin: ty,
                    code: v["code"].as_u64(),
                    msg: v["msg"].as_str().map(str::to_owned).unwrap_or_else(|| {
                        format!("exit {}; stderr: {}", out.code, out.stderr.trim())
                    }),
                });
            }
            let result: Value = serde_json::from_str(&out.stdout).map_err(|e| ChainError {
                plugin: ty.clone(),
                code: None,
                msg: format!("result is not JSON ({e}): {:?}", out.stdout),
            })?;
            prev = Some(result);
        }
        prev.ok_or_else(|| ChainError {
            plugin: "-".into(),
            code: None,
            msg: "empty chain".into(),
        })
    }

    /// DEL through the list in reverse with the cached result (never stops early).
    fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<()> {
        let mut failures = Vec::new();
        for plugin in self.plugins.iter().rev() {
            let ty = plugin["type"].as_str().unwrap_or_default();
            match self.exec("DEL", plugin, att, cached) {
                Ok(out) if out.code == 0 => {}
                Ok(out) => failures.push(format!("{ty}: {}", out.stdout.trim())),
                Err(e) => failures.push(format!("{ty}: {e:#}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("CNI DEL {}: {}", att.container_id, failures.join("; "))
        }
    }
}

/// A failed chain ADD.
#[derive(Debug)]
struct ChainError {
    plugin: String,
    code: Option<u64>,
    msg: String,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(
                f,
                "plugin {} failed with code {c}: {}",
                self.plugin, self.msg
            ),
            None => write!(f, "plugin {} failed: {}", self.plugin, self.msg),
        }
    }
}

/// The first IPv4 address and the host-side interface of a CNI result.
fn result_ip_and_veth(result: &Value) -> (Option<Ipv4Addr>, Option<String>) {
    let ip = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .next();
    // The host end of the veth: in the host (no sandbox) and not the bridge itself.
    let veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && i["mac"].is_string())
        .filter_map(|i| i["name"].as_str())
        .find(|n| n.starts_with("veth"))
        .map(str::to_owned);
    (ip, veth)
}

// ---------------------------------------------------------------- subnet

/// A parsed IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    addr: Ipv4Addr,
    len: u8,
}

impl Prefix {
    fn parse(s: &str) -> Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("subnet {s}: expected A.B.C.D/N"))?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("subnet {s}: bad address"))?;
        let len: u8 = l
            .parse()
            .with_context(|| format!("subnet {s}: bad length"))?;
        if len > 32 {
            bail!("subnet {s}: length over 32");
        }
        Ok(Self { addr, len })
    }

    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    fn network(self) -> u32 {
        u32::from(self.addr) & self.mask()
    }

    /// True if the two prefixes share an address.
    fn overlaps(self, other: Prefix) -> bool {
        let len = self.len.min(other.len);
        let p = Prefix {
            addr: self.addr,
            len,
        };
        let q = Prefix {
            addr: other.addr,
            len,
        };
        p.network() == q.network()
    }
}

/// Host routes (any table) whose destination overlaps `subnet`, default routes aside.
fn overlapping_routes(subnet: Prefix) -> Result<Vec<String>> {
    let text = cmd("ip", &["-4", "-j", "route", "show", "table", "all"])?;
    let routes: Value = serde_json::from_str(&text).context("ip -j route: not JSON")?;
    let mut hits = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        if dst == "default" {
            continue;
        }
        let p = if dst.contains('/') {
            Prefix::parse(dst)
        } else {
            Prefix::parse(&format!("{dst}/32"))
        };
        if let Ok(p) = p {
            if p.len > 0 && p.overlaps(subnet) {
                hits.push(format!("{dst} dev {}", r["dev"].as_str().unwrap_or("?")));
            }
        }
    }
    Ok(hits)
}

// ---------------------------------------------------------------- traffic

/// A TCP listener in the peer netns answering every connection with one line.
struct PeerListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PeerListener {
    fn start(ns: &Netns, ip: Ipv4Addr) -> Result<Self> {
        // The socket is created inside the peer netns and stays there; accept runs anywhere.
        let listener = ns
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PEER_PORT)))?
            .with_context(|| format!("netns {}: cannot listen on :{PEER_PORT}", ns.label()))?;
        listener
            .set_nonblocking(true)
            .context("peer listener: set_nonblocking")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "peer {ip}:{PEER_PORT} answered {from}");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `to` and returns the first line answered, or why not.
fn talk(ns: &Netns, to: SocketAddr) -> String {
    let res = ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, TRAFFIC_LIMIT)?;
        s.set_read_timeout(Some(TRAFFIC_LIMIT))?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while buf.len() < 512 {
            match s.read(&mut byte)? {
                0 => break,
                _ if byte[0] == b'\n' => break,
                _ => buf.push(byte[0]),
            }
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    });
    match res {
        Ok(Ok(line)) if line.is_empty() => "no answer (closed)".into(),
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("no answer ({e})"),
        Err(e) => format!("no answer ({e})"),
    }
}

/// Who answered a line from [`talk`].
fn answered_by(line: &str) -> &'static str {
    if line.starts_with("standin port=") {
        "stand-in (ztunnel)"
    } else if line.starts_with("peer ") {
        "peer (direct)"
    } else {
        "nobody"
    }
}

/// TCP ports listening in the netns (read from inside it).
fn listening_ports(ns: &Netns) -> Vec<u16> {
    let ports = ns.run(|| {
        let mut ports = BTreeSet::new();
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let Ok(text) = fs::read_to_string(f) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // Column 3 is the state; 0A is LISTEN.
                if cols.get(3) == Some(&"0A") {
                    if let Some(p) = cols.get(1).and_then(|a| a.rsplit(':').next()) {
                        if let Ok(p) = u16::from_str_radix(p, 16) {
                            ports.insert(p);
                        }
                    }
                }
            }
        }
        ports
    });
    ports.map(|p| p.into_iter().collect()).unwrap_or_default()
}

// ---------------------------------------------------------------- the stand-in's events

/// The stand-in's JSON event lines so far.
fn standin_events(file: &Path) -> Vec<Value> {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn has_event(events: &[Value], event: &str, uid: Option<&str>) -> bool {
    events
        .iter()
        .any(|e| e["event"] == event && uid.is_none_or(|u| e["uid"] == u))
}

// ---------------------------------------------------------------- resources and cleanup

/// Everything the demo made, so it can all be removed (in order, best effort).
#[derive(Default)]
struct Env {
    tmp: Option<PathBuf>,
    netns: Vec<String>,
    bridge: Option<String>,
    veths: Vec<String>,
    attached: Vec<(Chain, Attachment, Option<Value>)>,
    agent: Option<Child>,
    standin: Option<Child>,
    peer: Option<PeerListener>,
    ip_forward: Option<String>,
    done: bool,
}

fn stop_child(child: &mut Child, grace: Duration) -> String {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Ok(Some(st)) = child.try_wait() {
        return format!("had exited ({st})");
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return "stopped (SIGTERM)".into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    "killed (SIGKILL after SIGTERM)".into()
}

impl Env {
    /// True while the demo has made nothing that needs removing.
    fn is_empty(&self) -> bool {
        self.tmp.is_none()
            && self.netns.is_empty()
            && self.bridge.is_none()
            && self.attached.is_empty()
            && self.agent.is_none()
            && self.standin.is_none()
            && self.peer.is_none()
    }

    /// Removes everything; returns the failures (the table shows every step).
    fn cleanup(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut t = Table::new(&["WHAT", "RESULT"]);
        let mut failures = Vec::new();
        let mut note = |t: &mut Table, what: String, r: Result<String>| match r {
            Ok(s) => t.row(vec![what, s]),
            Err(e) => {
                t.row(vec![what.clone(), format!("FAILED: {e:#}")]);
                failures.push(format!("{what}: {e:#}"));
            }
        };
        if let Some(mut p) = self.peer.take() {
            p.stop();
            note(&mut t, "peer listener".into(), Ok("closed".into()));
        }
        // DEL while the agent runs, so it releases the pods as a runtime's DEL would.
        for (chain, att, cached) in self.attached.drain(..).rev() {
            let r = chain.del(&att, cached.as_ref()).map(|()| "ok".to_owned());
            note(&mut t, format!("CNI DEL {}", att.container_id), r);
        }
        if let Some(mut c) = self.standin.take() {
            let r = stop_child(&mut c, Duration::from_secs(2));
            note(&mut t, format!("ztunnel stand-in (pid {})", c.id()), Ok(r));
        }
        if let Some(mut c) = self.agent.take() {
            let r = stop_child(&mut c, Duration::from_secs(5));
            note(&mut t, format!("agent (pid {})", c.id()), Ok(r));
        }
        for ns in self.netns.drain(..).rev() {
            let r = cmd("ip", &["netns", "delete", &ns]).map(|_| "deleted".to_owned());
            note(&mut t, format!("netns {ns}"), r);
        }
        // The veths die with their netns; deleting a leftover one covers a DEL that failed.
        for v in self.veths.drain(..) {
            let gone = cmd("ip", &["link", "show", "dev", &v]).is_err();
            let r = if gone {
                Ok("gone".to_owned())
            } else {
                cmd("ip", &["link", "delete", &v]).map(|_| "deleted".to_owned())
            };
            note(&mut t, format!("link {v}"), r);
        }
        if let Some(b) = self.bridge.take() {
            let r = if cmd("ip", &["link", "show", "dev", &b]).is_err() {
                Ok("not created".to_owned())
            } else {
                cmd("ip", &["link", "delete", &b]).map(|_| "deleted".to_owned())
            };
            note(&mut t, format!("link {b} (bridge)"), r);
        }
        if let Some(old) = self.ip_forward.take() {
            let path = "/proc/sys/net/ipv4/ip_forward";
            let now = fs::read_to_string(path).unwrap_or_default();
            let r = if now.trim() == old.trim() {
                Ok(format!("unchanged ({})", old.trim()))
            } else {
                fs::write(path, &old)
                    .map(|()| format!("restored to {}", old.trim()))
                    .with_context(|| format!("write {path}"))
            };
            note(&mut t, "net.ipv4.ip_forward".into(), r);
        }
        if let Some(d) = self.tmp.take() {
            let r = fs::remove_dir_all(&d)
                .map(|()| "removed".to_owned())
                .with_context(|| format!("remove {}", d.display()));
            note(&mut t, format!("dir {}", d.display()), r);
        }
        t.print();
        failures
    }

    /// With `--keep`: what is left running and how to remove it.
    fn print_kept(&mut self) {
        self.done = true;
        println!("\nLeft running (--keep). To remove it all:");
        if let Some(c) = &self.standin {
            println!("  kill {}", c.id());
        }
        if let Some(c) = &self.agent {
            println!("  kill {}", c.id());
        }
        for ns in &self.netns {
            println!("  ip netns delete {ns}");
        }
        if let Some(b) = &self.bridge {
            println!("  ip link delete {b}");
        }
        if let Some(d) = &self.tmp {
            println!("  rm -rf {}", d.display());
        }
        // The peer listener lives in this process and ends with it.
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A panic unwinding through the steps still removes what was made.
        if !self.done {
            let _ = self.cleanup();
        }
    }
}

// ---------------------------------------------------------------- pods

/// One demo pod.
struct Pod {
    name: String,
    uid: String,
    netns_name: String,
    netns: Option<Netns>,
    att: Attachment,
    ip: Option<Ipv4Addr>,
    veth: Option<String>,
    add_ms: u128,
    add_note: String,
}

impl Pod {
    fn new(pid: u32, i: u8) -> Self {
        let name = format!("web-{i}");
        let uid = format!("demo-{pid}-{i}");
        Self {
            att: Attachment {
                container_id: format!("demo-{pid}-{name}"),
                netns_path: String::new(),
                args: format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name};\
                     K8S_POD_INFRA_CONTAINER_ID=demo-{pid}-{name};K8S_POD_UID={uid}"
                ),
            },
            netns_name: format!("ambient-demo-{pid}-{name}"),
            name,
            uid,
            netns: None,
            ip: None,
            veth: None,
            add_ms: 0,
            add_note: String::new(),
        }
    }
}

fn pod_json(name: &str, uid: &str, mode: Option<&str>) -> Value {
    let mut labels = json!({"app": "web"});
    if let Some(m) = mode {
        labels["istio.io/dataplane-mode"] = m.into();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid, "labels": labels},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "demo"}]},
        "status": {"phase": "Running"}
    })
}

/// Writes a JSON file atomically (the local pod source polls the directory).
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

fn add_netns(env: &mut Env, name: &str, host: NsId) -> Result<Netns> {
    cmd("ip", &["netns", "add", name])?;
    env.netns.push(name.to_owned());
    cmd("ip", &["-n", name, "link", "set", "lo", "up"])?;
    let path = PathBuf::from(format!("/var/run/netns/{name}"));
    Ok(Netns::open(&path, Some(host))?)
}

// ---------------------------------------------------------------- prerequisites

struct Prereqs {
    plugin: PathBuf,
    standin: PathBuf,
    redirector: Redirector,
}

fn check_prerequisites(args: &DemoArgs) -> Result<Prereqs> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_default();
    let plugin = args
        .plugin
        .clone()
        .unwrap_or_else(|| here.join("ambient-cni"));
    let standin = args
        .standin
        .clone()
        .unwrap_or_else(|| here.join("ztunnel-standin"));
    let mut t = Table::new(&["CHECK", "STATUS"]);
    let mut apt: BTreeSet<&str> = BTreeSet::new();
    let mut other: Vec<String> = Vec::new();
    let mut check =
        |t: &mut Table, what: String, ok: bool, fix: Option<&'static str>, hint: Option<String>| {
            t.row(vec![what, if ok { "ok".into() } else { "MISSING".into() }]);
            if !ok {
                if let Some(p) = fix {
                    apt.insert(p);
                }
                if let Some(h) = hint {
                    other.push(h);
                }
            }
        };
    let root = nix::unistd::geteuid().is_root();
    check(
        &mut t,
        "running as root".into(),
        root,
        None,
        Some("run the demo as root (sudo)".into()),
    );
    for p in ["bridge", "host-local"] {
        let path = Path::new(CNI_DIR).join(p);
        check(
            &mut t,
            path.display().to_string(),
            executable(&path),
            Some("containernetworking-plugins"),
            None,
        );
    }
    check(
        &mut t,
        "ip (iproute2)".into(),
        on_path("ip").is_some(),
        Some("iproute2"),
        None,
    );
    let iptables_tools = [
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
    ];
    if args.backend == BackendChoice::Iptables {
        for tool in iptables_tools {
            check(
                &mut t,
                tool.into(),
                on_path(tool).is_some(),
                Some("iptables"),
                None,
            );
        }
    }
    check(
        &mut t,
        format!("ambient-cni plugin {}", plugin.display()),
        executable(&plugin),
        None,
        Some(format!(
            "build the plugin (`cargo build --release -p ambient-cni`) and pass --plugin PATH (looked at {})",
            plugin.display()
        )),
    );
    check(
        &mut t,
        format!("ztunnel stand-in {}", standin.display()),
        executable(&standin),
        None,
        Some(format!(
            "build it (`cargo build --release -p ambient-cni-tests --bin ztunnel-standin`) and pass --standin PATH (looked at {})",
            standin.display()
        )),
    );
    let subnet = Prefix::parse(&args.subnet)?;
    if subnet.len > 29 {
        bail!(
            "subnet {}: too small for a gateway, {} pods and a peer",
            args.subnet,
            args.pods
        );
    }
    if (1u32 << (32 - subnet.len)) < u32::from(args.pods) + 4 {
        bail!("subnet {}: too small for {} pods", args.subnet, args.pods);
    }
    let clashes = if on_path("ip").is_some() {
        overlapping_routes(subnet)?
    } else {
        Vec::new()
    };
    check(
        &mut t,
        format!("subnet {} unused on this host", args.subnet),
        clashes.is_empty(),
        None,
        Some(format!(
            "subnet {} overlaps routes here ({}): pass --subnet with a free /24",
            args.subnet,
            clashes.join(", ")
        )),
    );
    // The rules backend the agent will pick (same code, same host).
    let redirector = if root {
        match crate::run::redirector_from(args.backend) {
            Ok(r) => {
                t.row(vec![
                    format!("in-pod rules backend ({:?})", args.backend),
                    format!("ok: {}", r.kind()),
                ]);
                Some(r)
            }
            Err(e) => {
                t.row(vec![
                    format!("in-pod rules backend ({:?})", args.backend),
                    "MISSING".into(),
                ]);
                apt.insert(if args.backend == BackendChoice::Nftables {
                    "nftables"
                } else {
                    "iptables"
                });
                other.push(format!("rules backend: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    t.print();
    if !apt.is_empty() || !other.is_empty() {
        let mut msg = String::from("prerequisites missing:");
        if !apt.is_empty() {
            let pkgs: Vec<&str> = apt.into_iter().collect();
            msg.push_str(&format!("\n  apt-get install -y {}", pkgs.join(" ")));
        }
        for o in other {
            msg.push_str(&format!("\n  {o}"));
        }
        bail!(msg);
    }
    let redirector = redirector.ok_or_else(|| anyhow!("no rules backend"))?;
    Ok(Prereqs {
        plugin,
        standin,
        redirector,
    })
}

// ---------------------------------------------------------------- the agent

/// A free loopback port (bound then released; the agent binds it a moment later).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Whether this build's `run` takes `flag` (health/metrics ports are optional wiring).
fn run_supports(flag: &str) -> bool {
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    Command::new(exe)
        .args(["run", "--help"])
        .env_clear()
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------- the steps

/// Runs the demo; everything it made is removed before it returns (unless `--keep`).
pub fn run(args: DemoArgs) -> Result<()> {
    install_signal_handlers()?;
    let mut env = Env::default();
    let result = steps(&args, &mut env);
    if env.is_empty() {
        // Nothing was made (e.g. a prerequisite is missing): the error says it all.
        env.done = true;
        return result;
    }
    if let Err(e) = &result {
        println!("\nThe demo stopped: {e:#}");
    }
    if args.keep && result.is_ok() {
        env.print_kept();
        return result;
    }
    heading(8, "Clean up");
    let failures = env.cleanup();
    match (result, failures.is_empty()) {
        (Ok(()), true) => {
            println!("\nnothing left behind.");
            Ok(())
        }
        (Ok(()), false) => bail!("cleanup failed: {}", failures.join("; ")),
        (Err(e), _) => Err(e),
    }
}

/// What the started agent offers the later steps.
struct Started {
    /// The conflist as the installer left it, with `CNI_PATH`.
    chain: Chain,
    /// The conflist file.
    conflist: PathBuf,
    /// The rules options the agent applies (for `show`).
    cfg: InpodConfig,
    /// Health and metrics addresses, when this build serves them.
    ports: Option<(SocketAddr, SocketAddr)>,
    /// The stand-in's event file.
    events: PathBuf,
}

fn steps(args: &DemoArgs, env: &mut Env) -> Result<()> {
    let pid = std::process::id();
    println!(
        "ambient-cni demo: {} pods on a bridge, the real CNI chain, the agent, a ztunnel stand-in",
        args.pods
    );

    heading(1, "Prerequisites");
    let pre = check_prerequisites(args)?;
    checkpoint()?;
    let host = Netns::host_id(Path::new("/proc")).context("cannot identify the host netns")?;
    let tmp = std::env::temp_dir().join(format!("ambient-cni-demo-{pid}"));
    fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    env.tmp = Some(tmp.clone());
    let mut pods: Vec<Pod> = (0..args.pods).map(|i| Pod::new(pid, i)).collect();

    heading(
        2,
        "Start the agent (it installs the plugin) and the ztunnel stand-in",
    );
    let st = start(args, &pre, env, &tmp, &pods)?;
    checkpoint()?;

    heading(
        3,
        &format!(
            "Create the pods: a netns each, then the CNI chain {} ({})",
            st.chain.describe(),
            args.subnet
        ),
    );
    let (peer_ns, peer_addr) = create_pods(env, &st, host, pid, &mut pods)?;

    heading(4, "What the agent did in each pod");
    let captured = status_table(&pods, &pre.redirector, &st.cfg, &st.events)?;
    let all: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    if captured != all {
        bail!("expected every pod captured, captured: {captured:?}");
    }
    println!(
        "  captured = the agent installed the in-pod rules and handed the netns to the \
         stand-in over ZDS, which now listens inside it"
    );

    heading(
        5,
        &format!("Traffic: each pod connects to the peer {peer_addr}, the peer to each pod"),
    );
    let expect_all: Vec<bool> = vec![true; pods.len()];
    traffic(&pods, &peer_ns, peer_addr, &expect_all)?;
    println!(
        "  outbound TCP is redirected to :15001 in the pod and the stand-in reads the original \
         destination; inbound is redirected to :15006 (and the reply routed back by the connmark + policy route)"
    );

    let released = &pods[0];
    heading(
        6,
        &format!(
            "Release {NAMESPACE}/{}: relabel it istio.io/dataplane-mode=none",
            released.name
        ),
    );
    write_json(
        &tmp.join("pods")
            .join("pods")
            .join(format!("{}.json", released.name)),
        &pod_json(&released.name, &released.uid, Some("none")),
    )?;
    let rel_ns = released
        .netns
        .as_ref()
        .context("released pod has no netns")?;
    wait_until(
        Duration::from_secs(20),
        "the agent to release the pod",
        || {
            let gone = pre
                .redirector
                .show(rel_ns, &st.cfg)
                .map(|r| r.installed.is_empty() && r.route.is_empty())
                .unwrap_or(false);
            Ok(gone && has_event(&standin_events(&st.events), "del", Some(&released.uid)))
        },
    )?;
    let captured = status_table(&pods, &pre.redirector, &st.cfg, &st.events)?;
    println!(
        "  the agent removed {}'s rules and sent DelWorkload; the stand-in closed its listeners",
        released.name
    );
    if captured != all[1..] {
        bail!(
            "expected {} released and the others captured, captured: {captured:?}",
            released.name
        );
    }

    heading(
        7,
        "Traffic again: the released pod goes direct, the others still through the stand-in",
    );
    let mut expect = expect_all;
    expect[0] = false;
    traffic(&pods, &peer_ns, peer_addr, &expect)?;

    if let Some((_, m)) = st.ports {
        println!("\n  the agent's metrics (http://{m}/metrics):");
        show_metrics(m)?;
    }
    println!(
        "\ndemo passed: {} pods captured, their traffic reached the stand-in with its original destination; \
         {NAMESPACE}/{} released and its traffic went direct.",
        pods.len(),
        released.name
    );
    Ok(())
}

/// Writes the pod source and the primary CNI config, starts the agent and the stand-in,
/// and waits until the plugin is chained in and the stand-in holds the snapshot.
fn start(
    args: &DemoArgs,
    pre: &Prereqs,
    env: &mut Env,
    tmp: &Path,
    pods: &[Pod],
) -> Result<Started> {
    let pods_dir = tmp.join("pods");
    fs::create_dir_all(pods_dir.join("pods")).context("create the pod source dir")?;
    fs::create_dir_all(pods_dir.join("namespaces")).context("create the pod source dir")?;
    write_json(
        &pods_dir
            .join("namespaces")
            .join(format!("{NAMESPACE}.json")),
        &json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}}
        }),
    )?;
    for p in pods {
        write_json(
            &pods_dir.join("pods").join(format!("{}.json", p.name)),
            &pod_json(&p.name, &p.uid, None),
        )?;
    }
    // The "primary CNI" of this host: a bridge with host-local IPAM. The agent's
    // installer chains ambient-cni into it, as it does on a node.
    let (bin_dir, conf_dir) = (tmp.join("cni-bin"), tmp.join("net.d"));
    fs::create_dir_all(&bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    fs::create_dir_all(&conf_dir).with_context(|| format!("create {}", conf_dir.display()))?;
    let bridge = format!("acnidemo{:x}", std::process::id() & 0xffff);
    env.bridge = Some(bridge.clone());
    let conflist = conf_dir.join("10-demo.conflist");
    write_json(
        &conflist,
        &json!({
            "cniVersion": CNI_VERSION,
            "name": "demo-net",
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "subnet": args.subnet, "dataDir": tmp.join("ipam")}
            }]
        }),
    )?;
    let plugin_sock = tmp.join("plugin.sock");
    let zds_sock = tmp.join("ztunnel.sock");
    let agent_log = tmp.join("agent.log");
    let mut agent_args: Vec<String> = vec!["run".into()];
    for (flag, value) in [
        ("--node-name", "demo-node".to_owned()),
        ("--pod-source", "local".into()),
        ("--local-pods-dir", pods_dir.display().to_string()),
        ("--agent-socket", plugin_sock.display().to_string()),
        ("--ztunnel-uds-address", zds_sock.display().to_string()),
        ("--run-dir", tmp.join("run").display().to_string()),
        ("--host-proc", "/proc".into()),
        ("--rules-backend", pre.redirector.kind().as_str().into()),
        ("--cni-bin-dir", bin_dir.display().to_string()),
        ("--cni-conf-dir", conf_dir.display().to_string()),
        ("--plugin-binary", pre.plugin.display().to_string()),
        ("--log-format", "text".into()),
    ] {
        agent_args.push(flag.into());
        agent_args.push(value);
    }
    let ports = if run_supports("--health-addr") && run_supports("--metrics-addr") {
        let (h, m) = (free_port()?, free_port()?);
        for (flag, port) in [("--health-addr", h), ("--metrics-addr", m)] {
            agent_args.push(flag.into());
            agent_args.push(format!("127.0.0.1:{port}"));
        }
        Some((
            SocketAddr::from((Ipv4Addr::LOCALHOST, h)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, m)),
        ))
    } else {
        None
    };
    // The same argv, parsed here: `show` compares against the agent's own rules options.
    let parsed = Cli::try_parse_from(
        std::iter::once("ambient-cni-agent".to_owned()).chain(agent_args.clone()),
    )
    .context("the demo's agent command line")?;
    let AgentCommand::Run(run_args) = parsed.command else {
        bail!("the demo's agent command line is not `run`");
    };
    let cfg: InpodConfig = crate::run::policy_from(&run_args)?.inpod;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let log =
        fs::File::create(&agent_log).with_context(|| format!("create {}", agent_log.display()))?;
    let agent = Command::new(&exe)
        .args(&agent_args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the agent {}", exe.display()))?;
    let agent_pid = agent.id();
    env.agent = Some(agent);
    let events = tmp.join("standin.jsonl");
    let standin = Command::new(&pre.standin)
        .arg("--socket")
        .arg(&zds_sock)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&events).context("create the stand-in's event file")?)
        .stderr(fs::File::create(tmp.join("standin.log")).context("create the stand-in's log")?)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the stand-in {}", pre.standin.display()))?;
    let standin_pid = standin.id();
    env.standin = Some(standin);
    let agent_alive = |env: &mut Env| -> Result<()> {
        if let Some(c) = env.agent.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!(
                    "the agent exited ({st}); its log:\n{}",
                    tail(&agent_log, 20)
                );
            }
        }
        Ok(())
    };
    wait_until(Duration::from_secs(20), "the agent's plugin socket", || {
        agent_alive(env)?;
        Ok(plugin_sock.exists())
    })?;
    let path = vec![bin_dir.clone(), PathBuf::from(CNI_DIR)];
    wait_until(
        Duration::from_secs(20),
        "the installer to chain ambient-cni in",
        || {
            agent_alive(env)?;
            Ok(Chain::load(&conflist, path.clone())
                .is_ok_and(|c| c.types().contains(&"ambient-cni"))
                && executable(&bin_dir.join("ambient-cni")))
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the agent's ZDS socket (state rebuilt)",
        || {
            agent_alive(env)?;
            Ok(zds_sock.exists())
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the stand-in to connect and get its snapshot",
        || Ok(has_event(&standin_events(&events), "snapshot_sent", None)),
    )?;
    let readyz = match ports {
        Some((h, _)) => {
            let mut last = String::new();
            wait_until(Duration::from_secs(20), "the agent's /readyz", || {
                agent_alive(env)?;
                Ok(match http::get(h, "/readyz", Duration::from_secs(1)) {
                    Ok((200, _)) => true,
                    Ok((code, body)) => {
                        last = format!("{code} {}", body.trim());
                        false
                    }
                    Err(e) => {
                        last = e.to_string();
                        false
                    }
                })
            })
            .with_context(|| format!("last answer: {last}"))?;
            format!("200 ready (http://{h}/readyz)")
        }
        None => "not served by this build".into(),
    };
    let chain = Chain::load(&conflist, path)?;
    let mut t = Table::new(&["PROCESS", "PID", "DETAIL"]);
    let rows = [
        (
            "agent",
            agent_pid.to_string(),
            format!("rules backend {}", pre.redirector.kind()),
        ),
        (
            "",
            String::new(),
            format!("pod source {}", pods_dir.display()),
        ),
        (
            "",
            String::new(),
            format!("plugin socket {}", plugin_sock.display()),
        ),
        (
            "",
            String::new(),
            format!("ZDS socket {}", zds_sock.display()),
        ),
        (
            "",
            String::new(),
            format!("installed {}", bin_dir.join("ambient-cni").display()),
        ),
        (
            "",
            String::new(),
            format!("chained into {}: {}", conflist.display(), chain.describe()),
        ),
        ("", String::new(), format!("readiness: {readyz}")),
        (
            "ztunnel stand-in",
            standin_pid.to_string(),
            "connected over ZDS, snapshot received".into(),
        ),
    ];
    for (a, b, c) in rows {
        t.row(vec![a.into(), b, c]);
    }
    t.print();
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    println!(
        "  namespace {NAMESPACE} is labelled istio.io/dataplane-mode=ambient; its pods: {}",
        names.join(", ")
    );
    Ok(Started {
        chain,
        conflist,
        cfg,
        ports,
        events,
    })
}

/// Creates the peer and the pods (netns + CNI ADD through the installed chain, with
/// a runtime's retries); returns the peer's netns and address.
fn create_pods(
    env: &mut Env,
    st: &Started,
    host: NsId,
    pid: u32,
    pods: &mut [Pod],
) -> Result<(Netns, SocketAddr)> {
    env.ip_forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok();
    // The peer: no Kubernetes pod name, so the plugin passes it through without asking.
    let peer_name = format!("ambient-demo-{pid}-peer");
    let peer_ns = add_netns(env, &peer_name, host)?;
    let peer_att = Attachment {
        container_id: format!("demo-{pid}-peer"),
        netns_path: format!("/var/run/netns/{peer_name}"),
        args: "IgnoreUnknown=1".into(),
    };
    let peer_result = st.chain.add(&peer_att).map_err(|e| {
        anyhow!(
            "peer (netns {peer_name}): CNI ADD with {}: {e}",
            st.conflist.display()
        )
    })?;
    let (peer_ip, peer_veth) = result_ip_and_veth(&peer_result);
    env.attached
        .push((st.chain.clone(), peer_att, Some(peer_result)));
    env.veths.extend(peer_veth.clone());
    let peer_ip = peer_ip.context("the bridge plugin gave the peer no IPv4 address")?;
    env.peer = Some(PeerListener::start(&peer_ns, peer_ip)?);
    let peer_addr = SocketAddr::from((peer_ip, PEER_PORT));
    for p in pods.iter_mut() {
        checkpoint()?;
        let ns = add_netns(env, &p.netns_name, host)?;
        p.att.netns_path = format!("/var/run/netns/{}", p.netns_name);
        let started = Instant::now();
        // A runtime retries a sandbox whose ADD failed with "try again" (code 11).
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match st.chain.add(&p.att) {
                Ok(r) => break r,
                Err(e) if e.code == Some(11) && attempt < 5 => {
                    let _ = st.chain.del(&p.att, None);
                    p.add_note = format!(" (retried: {})", e.msg);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    // The runtime tears the sandbox down after a failed ADD.
                    let _ = st.chain.del(&p.att, None);
                    bail!(
                        "pod {NAMESPACE}/{} (netns {}): CNI ADD: {e}",
                        p.name,
                        p.netns_name
                    );
                }
            }
        };
        p.add_ms = started.elapsed().as_millis();
        let (ip, veth) = result_ip_and_veth(&result);
        p.ip = ip;
        p.veth = veth.clone();
        env.veths.extend(veth);
        env.attached
            .push((st.chain.clone(), p.att.clone(), Some(result)));
        p.netns = Some(ns);
    }
    let mut t = Table::new(&["POD", "NETNS", "IP", "HOST VETH", "CNI ADD"]);
    t.row(vec![
        "(peer)".into(),
        peer_name,
        peer_ip.to_string(),
        peer_veth.unwrap_or_else(|| "-".into()),
        format!("not a pod (passed through); listening on :{PEER_PORT}"),
    ]);
    for p in pods.iter() {
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            p.netns_name.clone(),
            p.ip.map_or_else(|| "-".into(), |i| i.to_string()),
            p.veth.clone().unwrap_or_else(|| "-".into()),
            format!("ok in {} ms{}", p.add_ms, p.add_note),
        ]);
    }
    t.print();
    Ok((peer_ns, peer_addr))
}

/// Prints each pod's state; returns the names of the pods captured.
fn status_table<'a>(
    pods: &'a [Pod],
    redirector: &Redirector,
    cfg: &InpodConfig,
    events_file: &Path,
) -> Result<Vec<&'a str>> {
    let events = standin_events(events_file);
    let mut t = Table::new(&[
        "POD",
        "CAPTURED",
        "RULES (backend: state)",
        "STAND-IN LISTENING",
    ]);
    let mut captured = Vec::new();
    for p in pods {
        checkpoint()?;
        let ns = p.netns.as_ref().context("pod without netns")?;
        let (rules, complete) = match redirector.show(ns, cfg) {
            Ok(r) => {
                let n: usize = r.installed.sections.iter().map(|s| s.lines.len()).sum();
                let state = if r.complete {
                    format!("{n} rules + route, complete")
                } else if r.installed.is_empty() && r.route.is_empty() {
                    "none".into()
                } else {
                    format!("{n} rules, INCOMPLETE")
                };
                (format!("{}: {state}", r.installed.backend), r.complete)
            }
            Err(e) => (format!("cannot read: {e}"), false),
        };
        let ports: Vec<String> = listening_ports(ns)
            .into_iter()
            .filter(|p| (15000..16000).contains(p))
            .map(|p| p.to_string())
            .collect();
        let listening = !ports.is_empty();
        let added = events
            .iter()
            .rev()
            .find(|e| e["uid"] == p.uid.as_str() && (e["event"] == "add" || e["event"] == "del"))
            .is_some_and(|e| e["event"] == "add" && e["result"] != "nacked");
        let yes = complete && listening && added;
        if yes {
            captured.push(p.name.as_str());
        }
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            if yes { "yes".into() } else { "no".into() },
            rules,
            if listening {
                ports.join(",")
            } else {
                "-".into()
            },
        ]);
    }
    t.print();
    Ok(captured)
}

/// Sends the traffic and prints who answered; fails if it is not what `captured` says.
fn traffic(pods: &[Pod], peer_ns: &Netns, peer: SocketAddr, captured: &[bool]) -> Result<()> {
    let mut t = Table::new(&["FROM", "TO", "ANSWERED BY", "REPLY"]);
    let mut wrong = Vec::new();
    for (p, want) in pods.iter().zip(captured) {
        checkpoint()?;
        let ns = p.netns.as_ref().context("pod without netns")?;
        let out = talk(ns, peer);
        let want_out = if *want {
            format!("standin port=15001 orig={peer}")
        } else {
            format!("peer {peer} answered")
        };
        if !out.starts_with(&want_out) {
            wrong.push(format!(
                "{} -> {peer}: want {want_out:?}, got {out:?}",
                p.name
            ));
        }
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            peer.to_string(),
            answered_by(&out).into(),
            out,
        ]);
        let Some(ip) = p.ip else { continue };
        let to = SocketAddr::from((ip, PEER_PORT));
        let back = talk(peer_ns, to);
        if *want && !back.starts_with(&format!("standin port=15006 orig={to}")) {
            wrong.push(format!(
                "peer -> {}: want the stand-in's inbound port, got {back:?}",
                p.name
            ));
        }
        if !*want && back.starts_with("standin") {
            wrong.push(format!(
                "peer -> {}: released pod still captured inbound: {back:?}",
                p.name
            ));
        }
        t.row(vec![
            "(peer)".into(),
            to.to_string(),
            answered_by(&back).into(),
            back,
        ]);
    }
    t.print();
    if !wrong.is_empty() {
        bail!("traffic not as expected:\n  {}", wrong.join("\n  "));
    }
    Ok(())
}

/// Prints the headline metrics of the agent.
fn show_metrics(addr: SocketAddr) -> Result<()> {
    let (code, body) = http::get(addr, "/metrics", Duration::from_secs(3))?;
    if code != 200 {
        bail!("GET http://{addr}/metrics: status {code}");
    }
    let e = expo::parse(&body).with_context(|| format!("http://{addr}/metrics"))?;
    let mut t = Table::new(&["METRIC", "VALUE"]);
    let rows: [(&str, &[(&str, &str)]); 8] = [
        (
            "ambient_cni_plugin_requests_total",
            &[("command", "ADD"), ("result", "captured")],
        ),
        (
            "istio_cni_plugin_requests_total",
            &[("response_code", "200")],
        ),
        ("ambient_cni_enrolments_total", &[("result", "enabled")]),
        ("ambient_cni_pods", &[("state", "enabled")]),
        ("ambient_cni_pods", &[("state", "pending")]),
        ("ambient_cni_pods", &[("state", "failed")]),
        ("ztunnel_connected", &[]),
        ("ambient_cni_plugin_add_duration_seconds_count", &[]),
    ];
    for (name, labels) in rows {
        let shown = if labels.is_empty() {
            name.to_owned()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        let v = e
            .value(name, labels)
            .map_or_else(|| "-".into(), |v| v.to_string());
        t.row(vec![shown, v]);
    }
    t.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap() {
        let p = |s| Prefix::parse(s).unwrap();
        assert!(p("10.200.0.0/24").overlaps(p("10.200.0.7/32")));
        assert!(p("10.200.0.0/24").overlaps(p("10.0.0.0/8")));
        assert!(!p("10.200.0.0/24").overlaps(p("10.201.0.0/24")));
        assert!(Prefix::parse("10.0.0.0/33").is_err());
        assert!(Prefix::parse("10.0.0.0").is_err());
    }

    #[test]
    fn reads_ip_and_host_veth_from_a_bridge_result() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "acnidemo1", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [{"interface": 2, "address": "10.200.0.3/24", "gateway": "10.200.0.1"}]
        });
        assert_eq!(
            result_ip_and_veth(&r),
            (
                Some(Ipv4Addr::new(10, 200, 0, 3)),
                Some("veth1234abcd".into())
            )
        );
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(
            answered_by("standin port=15001 orig=10.0.0.1:80"),
            "stand-in (ztunnel)"
        );
        assert_eq!(
            answered_by("peer 10.0.0.1:8080 answered 10.0.0.2:5555"),
            "peer (direct)"
        );
        assert_eq!(answered_by("no answer (refused)"), "nobody");
    }

    #[test]
    fn pod_objects_parse_as_kubernetes_pods() {
        let v = pod_json("web-0", "u1", Some("none"));
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
        assert_eq!(
            pod.metadata
                .labels
                .unwrap()
                .get("istio.io/dataplane-mode")
                .map(String::as_str),
            Some("none")
        );
    }
}
