//! Helpers for the cross-crate integration tests and the development tools (the
//! demo, the ztunnel stand-in, bench-report): locating the built binaries, named
//! netns "pods" that clean themselves up, running CNI plugins exactly as a
//! runtime does (libcni's conflist semantics), and agent processes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod bench;
pub mod churn;
pub mod cni;
pub mod demo;
pub mod expo;
pub mod http;
pub mod kubelet;
pub mod node;
pub mod peers;

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";

/// True when running as root; otherwise prints why the test is skipped, and
/// panics when `CI` is set (CI runs as root, so a skip there is a failure).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI is set (CI runs as root)"
    );
    eprintln!("skipped {test}: needs root (network namespaces, bridges, iptables)");
    false
}

/// A unique short suffix for names of host objects (netns, bridges) of this test run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // Interface names are limited to 15 bytes: keep pid and counter short.
    format!("{prefix}{:x}{n:x}", std::process::id() % 0xffff)
}

/// The directory holding the workspace's built binaries (`target/<profile>`).
pub fn target_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build --workspace --bins`, as scripts/test.sh does) or set {env}",
        p.display()
    );
    p
}

/// The plugin under test (`AMBIENT_CNI_PLUGIN`, else the workspace build).
pub fn plugin_bin() -> PathBuf {
    binary("AMBIENT_CNI_PLUGIN", "ambient-cni")
}

/// The agent under test (`AMBIENT_CNI_AGENT`, else the workspace build).
pub fn agent_bin() -> PathBuf {
    binary("AMBIENT_CNI_AGENT", "ambient-cni-agent")
}

/// The ztunnel stand-in (`ZTUNNEL_STANDIN_BIN`, else the workspace build).
pub fn standin_bin() -> PathBuf {
    binary("ZTUNNEL_STANDIN_BIN", "ztunnel-standin")
}

/// The demo (`AMBIENT_CNI_DEMO`, else the workspace build).
pub fn demo_bin() -> PathBuf {
    binary("AMBIENT_CNI_DEMO", "ambient-cni-demo")
}

/// Runs `ip` with arguments (never a shell); panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    if let Err(e) = try_ip(args) {
        panic!("{e}");
    }
}

/// Runs `ip` with arguments (never a shell); its stdout, or an error naming the
/// command with its stderr.
pub fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    name: String,
    /// Made by this test (deleted on drop), or someone else's, e.g. a runtime's pod netns.
    owned: bool,
}

impl NamedNetns {
    /// Creates `acni<unique>` with loopback up.
    pub fn new() -> Self {
        Self::create(&unique("acni")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates the netns `name` with loopback up; the error names the netns.
    pub fn create(name: &str) -> Result<Self, String> {
        try_ip(&["netns", "add", name]).map_err(|e| format!("netns {name}: {e}"))?;
        // From here on, drop deletes it (also when bringing lo up fails).
        let ns = Self {
            name: name.to_owned(),
            owned: true,
        };
        try_ip(&["-n", name, "link", "set", "lo", "up"])
            .map_err(|e| format!("netns {name}: {e}"))?;
        Ok(ns)
    }

    /// Deletes it now, reporting failure (drop deletes silently).
    pub fn delete(self) -> Result<(), String> {
        // Deleted here (or failed and reported): drop must not try again.
        try_ip(&["netns", "delete", &self.keep()]).map(|_| ())
    }

    /// Gives up ownership: the netns stays after drop; returns its name.
    pub fn keep(self) -> String {
        let mut this = std::mem::ManuallyDrop::new(self);
        std::mem::take(&mut this.name)
    }

    /// An existing `/var/run/netns/<name>` made by someone else (a container runtime's pod
    /// netns): probed like ours, never deleted by the test.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// The netns name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, as a runtime passes it in `CNI_NETNS`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs a command inside the netns (argv, no shell) and returns stdout.
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(argv);
        Command::new("ip")
            .args(&args)
            .output()
            .expect("exec ip netns exec")
    }
}

impl Default for NamedNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A host link (e.g. a bridge made by the bridge plugin), deleted on drop.
#[derive(Debug)]
pub struct HostLink(pub String);

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `/tmp/<prefix><unique>`.
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    /// A path inside.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one plugin exec printed and returned.
#[derive(Debug, Clone)]
pub struct Exec {
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// Exit code (-1 if killed).
    pub code: i32,
    /// Wall time of the exec.
    pub elapsed: Duration,
}

impl Exec {
    /// stdout parsed as JSON (panics with the text if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts the spec's error JSON with `code` is all that was printed, and exit 1.
    pub fn assert_error(&self, code: u64) -> Value {
        assert_eq!(
            self.code, 1,
            "exit code; stdout={} stderr={}",
            self.stdout, self.stderr
        );
        let v = self.json();
        assert_eq!(v["code"], code, "error code; got {v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "msg: {v}");
        assert!(v["cniVersion"].is_string(), "cniVersion: {v}");
        let keys: Vec<_> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for k in &keys {
            assert!(
                ["cniVersion", "code", "msg", "details"].contains(&k.as_str()),
                "extra key {k} in {v}"
            );
        }
        v
    }
}

/// Execs a CNI plugin binary with `env` and `stdin`, as libcni does; killed after `limit`.
/// `elapsed` runs from just before the spawn to the moment the kernel reports the exit
/// (a blocking pidfd wait, no polling), so benches that time through this are exact.
pub fn exec_plugin(bin: &Path, env: &[(&str, &str)], stdin: &[u8], limit: Duration) -> Exec {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied());
    exec_timed(cmd, stdin, limit)
}

/// Runs `cmd` with `stdin`, killed after `limit`, timed as [`exec_plugin`] times it (benches
/// time `/bin/true` and `sleep 0.001` through this to show the harness adds nothing).
pub fn exec_timed(mut cmd: Command, stdin: &[u8], limit: Duration) -> Exec {
    let bin = PathBuf::from(cmd.get_program());
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    // Writer and readers on their own threads: a plugin that stops reading, or writes more
    // than a pipe holds, must not block the test.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = wait_limited(&mut child, limit);
    let elapsed = start.elapsed();
    let _ = writer.join();
    Exec {
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        code: status,
        elapsed,
    }
}

/// Runs the agent binary's CLI (`status`, `doctor`, …) to completion: (exit code, stdout + stderr).
pub fn agent_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("exec {}: {e}", agent_bin().display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Waits for a child at most `limit`, killing it after; returns its exit code or -1.
/// Blocks on a pidfd (woken by the exit itself), so the wait adds no polling delay.
pub fn wait_limited(child: &mut Child, limit: Duration) -> i32 {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    let exited = if fd < 0 {
        // No pidfd (kernel < 5.3): a blocking wait in a helper thread, bounded by `limit`.
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: a zeroed siginfo_t is a valid out-parameter; WNOWAIT leaves the child
            // to be reaped by `child.wait()` below.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waits for our own child.
            let rc =
                unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
            let _ = tx.send(rc);
        });
        rx.recv_timeout(limit).is_ok()
    } else {
        let fd = fd as libc::c_int;
        let deadline = Instant::now() + limit;
        let mut ready = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                ready = true;
                break;
            }
            if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break;
            }
        }
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(fd) };
        ready
    };
    if exited {
        if let Ok(st) = child.wait() {
            return st.code().unwrap_or(-1);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    -1
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A running `ambient-cni-agent run` with a local pod source, killed (SIGKILL) on drop.
///
/// Everything lives under one directory: `plugin.sock`, `ztunnel.sock`, `pods/`
/// (the local pod source), `run/` (state records) and `agent.log`.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    /// The base directory.
    pub dir: PathBuf,
    /// The plugin socket it serves.
    pub socket: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent under `dir` with `extra` flags; waits until it is ready.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        // The log is appended across restarts in one dir: wait for a new "agent ready".
        let before = std::fs::read_to_string(dir.join("agent.log"))
            .unwrap_or_default()
            .matches("agent ready")
            .count();
        let mut me = Self::spawn(dir, extra);
        let ready = wait_for(Duration::from_secs(20), || {
            me.log_text().matches("agent ready").count() > before
        });
        if !ready {
            me.kill();
            panic!("agent did not become ready; log:\n{}", me.log_text());
        }
        me
    }

    /// Starts the agent under `dir` with `extra` flags and returns at once (not waiting for ready).
    pub fn spawn(dir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(dir.join("pods")).expect("pods dir");
        let log = dir.join("agent.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let socket = dir.join("plugin.sock");
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--agent-socket")
            .arg(&socket)
            .arg("--ztunnel-uds-address")
            .arg(dir.join("ztunnel.sock"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(["--pod-source", "local", "--local-pods-dir"])
            .arg(dir.join("pods"))
            .arg("--install-cni=false")
            .args(extra)
            .env("NODE_NAME", "test-node")
            // Any free port: tests run agents side by side (flags in `extra` override).
            .env("HEALTH_ADDR", "127.0.0.1:0")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf);
        if !extra.contains(&"--log-level") {
            cmd.args(["--log-level", "info,ambient_cni_agent=debug"]);
        }
        let child = cmd.spawn().expect("spawn agent");
        Self {
            child,
            dir: dir.to_owned(),
            socket,
            log,
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (what the kubelet does) and waits up to `limit` for the agent to exit;
    /// its exit status, or `None` when it was still running (then it is killed).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// SIGKILLs the agent and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a Namespace object into a local pod source directory.
pub fn write_namespace(pods_dir: &Path, name: &str, labels: Value) {
    let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}});
    write_obj(&pods_dir.join("namespaces"), name, &obj);
}

/// Writes a running Pod object into a local pod source directory; returns its file stem.
pub fn write_pod(
    pods_dir: &Path,
    ns: &str,
    name: &str,
    uid: &str,
    ip: Option<&str>,
    labels: Value,
) -> String {
    let mut obj = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid, "labels": labels},
        "spec": {"nodeName": "test-node", "serviceAccountName": "sa-" .to_owned() + name, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    });
    if let Some(ip) = ip {
        obj["status"]["podIP"] = ip.into();
        obj["status"]["podIPs"] = json!([{"ip": ip}]);
    }
    let stem = format!("{ns}_{name}");
    write_obj(&pods_dir.join("pods"), &stem, &obj);
    stem
}

/// A pod as Istio's injector leaves it with the CNI on (Istio's plugin test pod), on
/// `test-node`, not started: the status annotation, `istio-validation`, an app and
/// `istio-proxy` (`proxy sidecar`).
pub fn injected_pod(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name,
                     "annotations": {"sidecar.istio.io/status": "true"}},
        "spec": {
            "nodeName": "test-node",
            "initContainers": [{"name": "istio-validation", "image": "proxyv2"}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]}
            ]
        },
        "status": {"phase": "Pending"}
    })
}

/// Writes any Pod object (e.g. a sidecar-injected one) into a local pod source directory;
/// returns its file stem.
pub fn write_pod_object(pods_dir: &Path, pod: &Value) -> String {
    let meta = &pod["metadata"];
    let stem = format!(
        "{}_{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    );
    write_obj(&pods_dir.join("pods"), &stem, pod);
    stem
}

/// Removes a Pod object from a local pod source directory.
pub fn delete_pod(pods_dir: &Path, stem: &str) {
    let _ = std::fs::remove_file(pods_dir.join("pods").join(format!("{stem}.json")));
}

fn write_obj(dir: &Path, stem: &str, obj: &Value) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let tmp = dir.join(format!(".{stem}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(obj).expect("json")).expect("write");
    std::fs::rename(tmp, dir.join(format!("{stem}.json"))).expect("rename");
}

/// A running ztunnel stand-in; its JSON-line events are read from its stdout file.
#[derive(Debug)]
pub struct Standin {
    child: Child,
    out: PathBuf,
}

impl Standin {
    /// Starts the stand-in against `socket`, with extra flags; output to `out`.
    pub fn start(socket: &Path, out: &Path, extra: &[&str]) -> Self {
        let f = std::fs::File::create(out).expect("standin out");
        let child = Command::new(standin_bin())
            .arg("--socket")
            .arg(socket)
            .args(["--max-backoff-ms", "100"])
            .args(extra)
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn standin");
        Self {
            child,
            out: out.to_owned(),
        }
    }

    /// All events so far.
    pub fn events(&self) -> Vec<Value> {
        standin_events(&self.out)
    }

    /// Events of a kind.
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// Waits until `n` events of `kind` have been seen.
    pub fn wait_count(&self, kind: &str, n: usize, limit: Duration) -> bool {
        wait_for(limit, || self.events_of(kind).len() >= n)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The JSON-line events a stand-in wrote to `file` so far (a partial last line is skipped).
pub fn standin_events(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The plugin's conflist entry for tests.
pub fn plugin_entry(socket: &Path, timeout_ms: u64) -> Value {
    json!({
        "type": "ambient-cni",
        "name": "ambient-cni",
        "agent_socket": socket,
        "timeout_ms": timeout_ms,
        "log_level": "debug",
    })
}
