//! Helpers for the churn + fault suite: a seeded RNG, an agent process that runs
//! its installer against a temp CNI dir, the stand-in's held set from its events,
//! and what a process holds open (`/proc/<pid>/fd`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{agent_bin, wait_for};

/// A small seeded PRNG (splitmix64): the same seed replays the same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Settings of a churn run, from the environment.
#[derive(Debug, Clone)]
pub struct ChurnConfig {
    /// `CHURN_SEED` (decimal or 0x-hex), default a fixed seed.
    pub seed: u64,
    /// `CHURN_PODS`: pods created in all.
    pub pods: usize,
    /// Pods per wave.
    pub wave: usize,
    /// `RULES_BACKEND` for the agent (`CHURN_BACKEND`, default nftables).
    pub backend: String,
}

/// The default seed (printed, so a failing run can be replayed with `CHURN_SEED`).
pub const DEFAULT_SEED: u64 = 0x00ac_0c4a_5eed;

impl ChurnConfig {
    /// Reads `CHURN_SEED`, `CHURN_PODS`, `CHURN_FULL`, `CHURN_BACKEND`.
    pub fn from_env() -> Self {
        let full = std::env::var("CHURN_FULL").is_ok_and(|v| v == "1");
        let seed = std::env::var("CHURN_SEED")
            .ok()
            .and_then(|s| parse_seed(&s))
            .unwrap_or(DEFAULT_SEED);
        let (default_pods, wave) = if full { (300, 30) } else { (60, 15) };
        let pods = std::env::var("CHURN_PODS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_pods);
        let backend = std::env::var("CHURN_BACKEND").unwrap_or_else(|_| "nftables".into());
        Self {
            seed,
            pods,
            wave,
            backend,
        }
    }
}

fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// An agent started with the installer on (temp conf/bin dirs), killed on drop.
#[derive(Debug)]
pub struct InstallingAgent {
    child: Child,
    log: PathBuf,
}

/// Where an [`InstallingAgent`] lives.
#[derive(Debug, Clone)]
pub struct AgentDirs {
    /// Base: `plugin.sock`, `ztunnel.sock`, `pods/`, `run/`, `agent.log`.
    pub base: PathBuf,
    /// `--cni-conf-dir`.
    pub conf_dir: PathBuf,
    /// `--cni-bin-dir`.
    pub bin_dir: PathBuf,
    /// `--plugin-binary`.
    pub plugin: PathBuf,
    /// `--rules-backend`.
    pub backend: String,
}

impl AgentDirs {
    /// The plugin socket.
    pub fn socket(&self) -> PathBuf {
        self.base.join("plugin.sock")
    }
    /// The ZDS socket.
    pub fn zds(&self) -> PathBuf {
        self.base.join("ztunnel.sock")
    }
    /// The run dir.
    pub fn run_dir(&self) -> PathBuf {
        self.base.join("run")
    }
    /// The local pod source.
    pub fn pods(&self) -> PathBuf {
        self.base.join("pods")
    }
}

impl InstallingAgent {
    /// Starts the agent and waits (at most 20 s) for "agent ready" in its log.
    pub fn start(d: &AgentDirs) -> Result<Self, String> {
        std::fs::create_dir_all(d.pods()).map_err(|e| format!("pods dir: {e}"))?;
        let log = d.base.join("agent.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("agent log: {e}"))?;
        let before = read(&log).matches("agent ready").count();
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--agent-socket")
            .arg(d.socket())
            .arg("--ztunnel-uds-address")
            .arg(d.zds())
            .arg("--run-dir")
            .arg(d.run_dir())
            .args(["--pod-source", "local", "--local-pods-dir"])
            .arg(d.pods())
            .args(["--install-cni=true", "--cni-conf-dir"])
            .arg(&d.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&d.bin_dir)
            .arg("--plugin-binary")
            .arg(&d.plugin)
            .args(["--rules-backend", &d.backend])
            // The drift verifier at its fastest: it must never fight ADD/DEL (issue 19).
            .args(["--verify-interval", "1"])
            .args([
                "--health-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .args(["--log-level", "info,ambient_cni_agent=debug"])
            .env("NODE_NAME", "test-node")
            .stdout(logf.try_clone().map_err(|e| e.to_string())?)
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("spawn agent: {e}"))?;
        let mut me = Self { child, log };
        let ready = wait_for(Duration::from_secs(20), || {
            read(&me.log).matches("agent ready").count() > before
        });
        if !ready {
            me.kill();
            return Err(format!(
                "agent did not become ready; log tail:\n{}",
                me.log_tail(40)
            ));
        }
        Ok(me)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = read(&self.log);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for InstallingAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// What a stand-in holds, replayed from its JSON events: uid → netns inode.
pub fn standin_held(events: &[Value]) -> HashMap<String, u64> {
    let mut held = HashMap::new();
    for e in events {
        let uid = e["uid"].as_str().unwrap_or_default().to_owned();
        match (e["event"].as_str(), e["result"].as_str()) {
            (Some("add"), Some("started" | "replaced" | "noop")) => {
                if let Some(ino) = e["netns_inode"].as_u64() {
                    held.insert(uid, ino);
                }
            }
            (Some("del"), _) if e["phase"] == "steady" => {
                held.remove(&uid);
            }
            (Some("drained"), _) => {
                held.remove(&uid);
            }
            _ => {}
        }
    }
    held
}

/// The fds of a process: netns inodes it holds (`net:[N]`), and how many others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdCensus {
    /// netns inode → how many fds point at it.
    pub netns: BTreeMap<u64, usize>,
    /// Every other fd.
    pub other: usize,
    /// Other fds by kind (`socket`, `anon_inode:[eventfd]`, a file path, ...).
    pub kinds: BTreeMap<String, usize>,
}

impl FdCensus {
    /// Reads `/proc/<pid>/fd` (fds closing while we read are skipped). A netns fd
    /// reads back as `net:[N]` or as the path it was opened by (`/run/netns/x`):
    /// both are recognised by following the link to an nsfs inode.
    pub fn of(pid: u32) -> Result<Self, String> {
        use std::os::unix::fs::MetadataExt;
        let nsfs_dev = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| format!("/proc/self/ns/net: {e}"))?
            .dev();
        let dir = format!("/proc/{pid}/fd");
        let mut c = Self::default();
        for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let Ok(e) = e else { continue };
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let is_ns_link = target.to_string_lossy().starts_with("net:[");
            let md = std::fs::metadata(e.path()).ok();
            match md.filter(|m| m.dev() == nsfs_dev || is_ns_link) {
                Some(m) => *c.netns.entry(m.ino()).or_default() += 1,
                None => {
                    c.other += 1;
                    let t = target.to_string_lossy();
                    let kind = match t.split_once(":[") {
                        Some((k, _)) if !t.starts_with("anon_inode") => k.to_owned(),
                        _ => t.into_owned(),
                    };
                    *c.kinds.entry(kind).or_default() += 1;
                }
            }
        }
        Ok(c)
    }

    /// Total fds.
    pub fn total(&self) -> usize {
        self.other + self.netns.values().sum::<usize>()
    }
}

/// The agent's `status --json`: uid → (phase, netns inode, rules ok).
pub fn agent_status(run_dir: &Path) -> Result<HashMap<String, (String, u64, bool)>, String> {
    let out = Command::new(agent_bin())
        .arg("status")
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--json")
        .output()
        .map_err(|e| format!("exec status: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "status exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("status is not JSON: {e}"))?;
    let mut m = HashMap::new();
    for p in v["pods"].as_array().cloned().unwrap_or_default() {
        m.insert(
            p["uid"].as_str().unwrap_or_default().to_owned(),
            (
                p["phase"].as_str().unwrap_or_default().to_owned(),
                p["netns_inode"].as_u64().unwrap_or(0),
                p["rules_ok"].as_bool().unwrap_or(false),
            ),
        );
    }
    Ok(m)
}

/// The size of the in-pod ruleset in a netns: lines of `nft list ruleset`
/// (nftables) or `-A` rules of `iptables-save` + `ip6tables-save` (iptables).
/// A duplicated ruleset shows as a multiple of a single application's size.
pub fn ruleset_lines(netns_name: &str, backend: &str) -> usize {
    let run = |argv: &[&str]| {
        let mut args = vec!["netns", "exec", netns_name];
        args.extend_from_slice(argv);
        Command::new("ip")
            .args(&args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    if backend == "nftables" {
        run(&["nft", "list", "ruleset"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    } else {
        let mut text = run(&["iptables-save"]);
        text.push_str(&run(&["ip6tables-save"]));
        text.lines().filter(|l| l.starts_with("-A ")).count()
    }
}

/// A fake primary CNI conflist (bridge + host-local), as a primary CNI would write it.
pub fn primary_conflist(bridge: &str, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "churn-net",
        "plugins": [crate::cni::bridge_plugin(bridge, subnet, ipam_dir)],
    })
}

/// Our entries in a conflist text: (count, whether the last plugin is ours).
pub fn our_entries(text: &str) -> (usize, bool) {
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
    let ours = |p: &Value| p["type"] == "ambient-cni";
    (
        plugins.iter().filter(|p| ours(p)).count(),
        plugins.last().is_some_and(ours),
    )
}

/// Fault kinds the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// `kill -9` the agent, then start it again.
    AgentKill9,
    /// Kill the stand-in and start a fresh one (ztunnel restart).
    StandinRestart,
    /// Replace the stand-in with one that stops acking (`--stall-after`), for a while.
    StandinStall,
    /// The primary CNI rewrites its conflist (our entry gone); the installer must repair it.
    ConflistRewrite,
}

impl Fault {
    /// All kinds, in table order.
    pub const ALL: [Fault; 4] = [
        Fault::AgentKill9,
        Fault::StandinRestart,
        Fault::StandinStall,
        Fault::ConflistRewrite,
    ];

    /// A name for the summary.
    pub fn name(self) -> &'static str {
        match self {
            Fault::AgentKill9 => "agent kill -9 + restart",
            Fault::StandinRestart => "ztunnel restart",
            Fault::StandinStall => "ztunnel stall",
            Fault::ConflistRewrite => "conflist rewritten",
        }
    }
}

/// Counts of things seen during a run, for the summary table.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Faults by kind.
    pub faults: BTreeMap<Fault, usize>,
    /// ADD attempts that failed and were retried.
    pub add_retries: usize,
    /// Pods created.
    pub created: usize,
    /// Pods deleted.
    pub deleted: usize,
    /// Installer repair latencies (ms).
    pub repairs_ms: Vec<u128>,
}

/// The summary table printed at the end.
pub fn summary(t: &Tally, live: usize, violations: &[String], seed: u64) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "churn seed: {seed:#x} (replay: CHURN_SEED={seed:#x})\n"
    ));
    s.push_str("| what | count |\n|---|---|\n");
    s.push_str(&format!("| pods created | {} |\n", t.created));
    s.push_str(&format!("| pods deleted | {} |\n", t.deleted));
    s.push_str(&format!("| pods live at the end | {live} |\n"));
    s.push_str(&format!(
        "| ADD attempts retried (DEL + ADD) | {} |\n",
        t.add_retries
    ));
    for f in Fault::ALL {
        s.push_str(&format!(
            "| fault: {} | {} |\n",
            f.name(),
            t.faults.get(&f).copied().unwrap_or(0)
        ));
    }
    if let Some(max) = t.repairs_ms.iter().max() {
        s.push_str(&format!("| conflist repair, worst (ms) | {max} |\n"));
    }
    s.push_str(&format!("| violations | {} |\n", violations.len()));
    for v in violations.iter().take(30) {
        s.push_str(&format!("  - {v}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            let x = a.range(3, 9);
            assert_eq!(x, b.range(3, 9));
            assert!((3..9).contains(&x));
        }
    }

    #[test]
    fn held_set_follows_adds_dels_and_drains() {
        let ev = vec![
            json!({"event": "add", "uid": "a", "result": "started", "netns_inode": 1}),
            json!({"event": "add", "uid": "b", "result": "started", "netns_inode": 2}),
            json!({"event": "add", "uid": "c", "result": "nacked", "netns_inode": 3}),
            json!({"event": "del", "uid": "a", "phase": "steady"}),
            json!({"event": "drained", "uid": "b"}),
            json!({"event": "add", "uid": "b", "result": "replaced", "netns_inode": 4}),
        ];
        let h = standin_held(&ev);
        assert_eq!(h, HashMap::from([("b".to_owned(), 4)]));
    }

    #[test]
    fn conflist_entries() {
        let t = r#"{"plugins":[{"type":"bridge"},{"type":"ambient-cni"}]}"#;
        assert_eq!(our_entries(t), (1, true));
        assert_eq!(
            our_entries(r#"{"plugins":[{"type":"bridge"}]}"#),
            (0, false)
        );
    }

    #[test]
    fn seeds_parse_hex_and_decimal() {
        assert_eq!(parse_seed("0x10"), Some(16));
        assert_eq!(parse_seed("10"), Some(10));
        assert_eq!(parse_seed("x"), None);
    }
}

/// A ztunnel stand-in for the churn suite (pid exposed for the fd census), killed on drop.
#[derive(Debug)]
pub struct ChurnStandin {
    child: Child,
    out: PathBuf,
}

impl ChurnStandin {
    /// Starts `ztunnel-standin --socket zds` with `extra` flags, events to `out`.
    pub fn start(zds: &Path, out: &Path, extra: &[&str]) -> Result<Self, String> {
        let f = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let child = Command::new(crate::standin_bin())
            .arg("--socket")
            .arg(zds)
            .args(["--max-backoff-ms", "100"])
            .args(extra)
            .stdout(f)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn stand-in: {e}"))?;
        Ok(Self {
            child,
            out: out.to_owned(),
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its JSON events so far.
    pub fn events(&self) -> Vec<Value> {
        read(&self.out)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until it has seen `n` events of `kind`.
    pub fn wait_count(&self, kind: &str, n: usize, limit: Duration) -> bool {
        wait_for(limit, || {
            self.events().iter().filter(|e| e["event"] == kind).count() >= n
        })
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChurnStandin {
    fn drop(&mut self) {
        self.kill();
    }
}
