//! Churn under faults: pods created and deleted through the real CNI chain (the
//! conflist the agent's installer wrote: bridge + host-local + the installed
//! ambient-cni binary, real netns) while, at random moments, the agent is
//! `kill -9`ed and restarted, ztunnel (the stand-in) restarts or stalls, and the
//! primary CNI rewrites its conflist. Failed ADDs are retried like the kubelet
//! does (DEL, then ADD again, bounded). At the end every live pod must be held
//! exactly once everywhere and every deleted pod nowhere.
//!
//! `CHURN_SEED` (printed) replays a run's choices; `CHURN_PODS` sets the pod count
//! (default 60 in waves of 15; `CHURN_FULL=1`: 300 in waves of 30);
//! `CHURN_BACKEND` = nftables (default) | iptables.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_cni_tests::churn::*;
use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use serde_json::{json, Value};

const CONF_NAME: &str = "10-churn.conflist";
/// ADD attempts per pod, and the time they may take (the kubelet retries forever;
/// we bound it; faults are injected continuously during a wave, so a count alone
/// would fail an unlucky pod, not the agent).
const ADD_ATTEMPTS: usize = 40;
const ADD_WINDOW: Duration = Duration::from_secs(90);
/// Parallel "kubelet" workers.
const WORKERS: usize = 4;
/// Non-netns fds the agent may hold beyond its idle baseline (connections, timers).
const FD_SLACK: usize = 16;
/// Sockets the agent holds per held pod: the drift verifier's two netlink sockets inside its
/// netns (nf_tables and route/rule notifications), closed when the pod is released.
const NOTIFY_FDS_PER_POD: usize = 2;

struct Pod {
    name: String,
    uid: String,
    netns: NamedNetns,
    att: Attachment,
    result: Value,
    inode: u64,
}

struct Gone {
    name: String,
    uid: String,
    netns_path: String,
    inode: u64,
}

/// Everything the workers and the fault injector share.
struct World {
    dirs: AgentDirs,
    conf_file: PathBuf,
    primary: Value,
    agent: Mutex<Option<InstallingAgent>>,
    standin: Mutex<Option<ChurnStandin>>,
    standins: AtomicUsize,
    tally: Mutex<Tally>,
    violations: Mutex<Vec<String>>,
    /// What the run is doing, for violation messages.
    phase: Mutex<String>,
}

impl World {
    /// What the current stand-in holds (uid → netns inode); empty while none runs.
    fn standin_held(&self) -> HashMap<String, u64> {
        self.standin
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| standin_held(&s.events()))
            .unwrap_or_default()
    }

    fn violation(&self, v: String) {
        let v = format!("[{}] {v}", self.phase.lock().unwrap());
        eprintln!("VIOLATION: {v}");
        self.violations.lock().unwrap().push(v);
    }

    fn fault(&self, f: Fault) {
        *self.tally.lock().unwrap().faults.entry(f).or_default() += 1;
    }

    fn start_standin(&self, extra: &[&str]) {
        let n = self.standins.fetch_add(1, Ordering::SeqCst);
        let out = self.dirs.base.join(format!("standin-{n}.jsonl"));
        let mut slot = self.standin.lock().unwrap();
        // Old one first: one ztunnel per node.
        *slot = None;
        match ChurnStandin::start(&self.dirs.zds(), &out, extra) {
            Ok(s) => *slot = Some(s),
            Err(e) => self.violation(format!("stand-in start: {e}")),
        }
    }

    fn restart_agent(&self) {
        let mut slot = self.agent.lock().unwrap();
        if let Some(a) = slot.as_mut() {
            a.kill();
        }
        *slot = None;
        match InstallingAgent::start(&self.dirs) {
            Ok(a) => *slot = Some(a),
            Err(e) => self.violation(format!("agent restart: {e}")),
        }
    }

    fn agent_pid(&self) -> Option<u32> {
        self.agent
            .lock()
            .unwrap()
            .as_ref()
            .map(InstallingAgent::pid)
    }

    fn conflist_ok(&self) -> bool {
        let text = std::fs::read_to_string(&self.conf_file).unwrap_or_default();
        our_entries(&text) == (1, true)
    }

    /// One fault; each leaves the node healthy when it returns.
    fn inject(&self, f: Fault, rng: &mut Rng) {
        self.fault(f);
        match f {
            Fault::AgentKill9 => self.restart_agent(),
            Fault::StandinRestart => self.start_standin(&[]),
            Fault::StandinStall => {
                let after = rng.range(0, 3).to_string();
                self.start_standin(&["--stall-after", &after]);
                std::thread::sleep(Duration::from_millis(rng.range(500, 2500)));
                self.start_standin(&[]);
            }
            Fault::ConflistRewrite => {
                // The primary CNI writes its own file again, without our entry.
                let text = serde_json::to_string_pretty(&self.primary).unwrap();
                let t0 = Instant::now();
                std::fs::write(&self.conf_file, text).unwrap();
                if wait_for(Duration::from_secs(10), || self.conflist_ok()) {
                    self.tally
                        .lock()
                        .unwrap()
                        .repairs_ms
                        .push(t0.elapsed().as_millis());
                } else {
                    self.violation(
                        "installer did not repair the rewritten conflist in 10 s".into(),
                    );
                }
            }
        }
    }
}

/// ADD through the chain, retried like the kubelet: on failure DEL, wait, ADD again.
fn add_with_retry(w: &World, chain: &Chain, att: &Attachment) -> Result<Value, String> {
    let mut last = String::new();
    let t0 = Instant::now();
    for attempt in 0..ADD_ATTEMPTS {
        if t0.elapsed() > ADD_WINDOW {
            break;
        }
        match chain.add(att) {
            Ok(results) => return Ok(results.last().cloned().unwrap_or_default()),
            Err((i, e)) => {
                last = format!("plugin {i} code {} {}", e.code, e.stdout.trim());
                w.tally.lock().unwrap().add_retries += 1;
                let _ = chain.del(att, None);
                // The kubelet's back-off, capped.
                std::thread::sleep(Duration::from_millis(
                    (200 * (attempt as u64 + 1)).min(1000),
                ));
            }
        }
    }
    Err(last)
}

fn create_pod(w: &World, chain: &Chain, name: String) -> Option<Pod> {
    let netns = NamedNetns::new();
    let uid = format!("{}-{name}", netns.name());
    let inode = std::fs::metadata(netns.path())
        .map(|m| m.ino())
        .unwrap_or(0);
    write_pod(&w.dirs.pods(), "mesh", &name, &uid, None, json!({}));
    let att = Attachment::pod(&netns.path(), "mesh", &name, &uid);
    match add_with_retry(w, chain, &att) {
        Ok(result) => {
            w.tally.lock().unwrap().created += 1;
            Some(Pod {
                name,
                uid,
                netns,
                att,
                result,
                inode,
            })
        }
        Err(e) => {
            w.violation(format!(
                "pod {name}: ADD never succeeded ({ADD_ATTEMPTS} tries, {ADD_WINDOW:?}): {e}"
            ));
            let _ = chain.del(&att, None);
            delete_pod(&w.dirs.pods(), &format!("mesh_{name}"));
            None
        }
    }
}

/// The kubelet's order: CNI DEL, the sandbox (netns) goes, then the API object.
fn delete(w: &World, chain: &Chain, pod: Pod) -> Gone {
    if let Err((i, e)) = chain.del(&pod.att, Some(&pod.result)) {
        w.violation(format!("pod {}: DEL failed at plugin {i}: {e:?}", pod.name));
    }
    let gone = Gone {
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        netns_path: pod.netns.path(),
        inode: pod.inode,
    };
    drop(pod.netns);
    delete_pod(&w.dirs.pods(), &format!("mesh_{}", pod.name));
    w.tally.lock().unwrap().deleted += 1;
    gone
}

/// Runs `jobs` on `WORKERS` threads.
fn parallel<T: Send, R: Send>(jobs: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let queue = Mutex::new(jobs);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| loop {
                let Some(job) = queue.lock().unwrap().pop() else {
                    return;
                };
                let r = f(job);
                out.lock().unwrap().push(r);
            });
        }
    });
    out.into_inner().unwrap()
}

/// The reference size of one application of the ruleset (scratch netns).
fn reference_ruleset(backend: &str) -> usize {
    let ns = NamedNetns::new();
    let out = std::process::Command::new(agent_bin())
        .args([
            "redirect",
            "apply",
            "--netns",
            &ns.path(),
            "--backend",
            backend,
        ])
        .output()
        .expect("exec redirect apply");
    assert!(
        out.status.success(),
        "redirect apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ruleset_lines(ns.name(), backend)
}

fn fault_order(rng: &mut Rng) -> Vec<Fault> {
    // Every kind at least once, in a seeded order.
    let mut v = Fault::ALL.to_vec();
    for i in (1..v.len()).rev() {
        let j = rng.range(0, i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

#[test]
fn churn_with_agent_kills_ztunnel_faults_and_conflist_rewrites() {
    if !require_root("churn_with_agent_kills_ztunnel_faults_and_conflist_rewrites") {
        return;
    }
    let cfg = ChurnConfig::from_env();
    println!(
        "churn: seed {:#x} (CHURN_SEED to replay), {} pods in waves of {}, backend {}",
        cfg.seed, cfg.pods, cfg.wave, cfg.backend
    );
    let started = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let base = TempDir::new("acni-churn");
    let bridge = HostLink(unique("acch"));
    let conf_dir = base.join("conf");
    let bin_dir = base.join("bin");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&bin_dir).unwrap();
    let primary = primary_conflist(&bridge.0, "10.97.0.0/16", &base.join("ipam"));
    let conf_file = conf_dir.join(CONF_NAME);
    std::fs::write(&conf_file, serde_json::to_string_pretty(&primary).unwrap()).unwrap();
    let dirs = AgentDirs {
        base: base.0.clone(),
        conf_dir,
        bin_dir: bin_dir.clone(),
        plugin: plugin_bin(),
        backend: cfg.backend.clone(),
    };
    write_namespace(
        &dirs.pods(),
        "mesh",
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let reference = reference_ruleset(&cfg.backend);
    assert!(reference > 0, "reference ruleset is empty");

    let w = Arc::new(World {
        dirs: dirs.clone(),
        conf_file: conf_file.clone(),
        primary,
        agent: Mutex::new(None),
        standin: Mutex::new(None),
        standins: AtomicUsize::new(0),
        tally: Mutex::new(Tally::default()),
        violations: Mutex::new(Vec::new()),
        phase: Mutex::new("setup".into()),
    });
    *w.agent.lock().unwrap() = Some(InstallingAgent::start(&dirs).expect("agent start"));
    w.start_standin(&[]);
    assert!(
        w.standin.lock().unwrap().as_ref().unwrap().wait_count(
            "snapshot_sent",
            1,
            Duration::from_secs(15)
        ),
        "stand-in got no snapshot"
    );
    assert!(
        wait_for(Duration::from_secs(10), || w.conflist_ok()),
        "installer did not chain the plugin into {}",
        conf_file.display()
    );
    // Idle baseline of the agent's fds (no pods yet).
    let baseline = FdCensus::of(w.agent_pid().unwrap()).unwrap();

    // The chain is what the kubelet would load: the installed conflist, the installed binary.
    let installed: Value =
        serde_json::from_str(&std::fs::read_to_string(&conf_file).unwrap()).unwrap();
    let chain = Chain {
        conflist: installed,
        path: vec![PathBuf::from(DEBIAN_CNI_DIR), bin_dir],
        limit: Duration::from_secs(20),
        max_version: vec![],
    };

    let mut live: Vec<Pod> = Vec::new();
    let mut gone: Vec<Gone> = Vec::new();
    let mut first_faults = fault_order(&mut rng);
    let mut next = 0usize;
    while next < cfg.pods {
        let n = cfg.wave.min(cfg.pods - next);
        let names: Vec<String> = (next..next + n).map(|i| format!("c{i}")).collect();
        next += n;
        // Faults at random moments while this wave's pods come and go.
        let stop = Arc::new(AtomicBool::new(false));
        let mut frng = Rng::new(rng.next_u64());
        let forced: Vec<Fault> = first_faults.drain(..first_faults.len().min(2)).collect();
        let injector = {
            let (w, stop) = (w.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut forced = forced.into_iter();
                while !stop.load(Ordering::SeqCst) {
                    let pause = frng.range(50, 400);
                    let until = Instant::now() + Duration::from_millis(pause);
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let f = forced.next().unwrap_or_else(|| {
                        Fault::ALL[frng.range(0, Fault::ALL.len() as u64) as usize]
                    });
                    w.inject(f, &mut frng);
                }
                // A wave shorter than the pauses still gets its forced faults.
                for f in forced {
                    w.inject(f, &mut frng);
                }
            })
        };
        let created = parallel(names, |name| create_pod(&w, &chain, name));
        live.extend(created.into_iter().flatten());
        // Delete a random ~40% of what lives.
        let mut doomed = Vec::new();
        let mut keep = Vec::new();
        for p in live.drain(..) {
            if rng.chance(0.4) {
                doomed.push(p);
            } else {
                keep.push(p);
            }
        }
        live = keep;
        gone.extend(parallel(doomed, |p| delete(&w, &chain, p)));
        stop.store(true, Ordering::SeqCst);
        injector.join().expect("injector thread");
        // Check between waves too: a later agent kill -9 would hide a leak.
        if next < cfg.pods {
            check(
                &w,
                &cfg,
                &live,
                &gone,
                reference,
                &baseline,
                &format!("pod {next}"),
            );
        }
    }
    // Faults forced but not yet fired (very short runs): fire them now.
    for f in first_faults {
        w.inject(f, &mut rng);
    }
    let churn_time = started.elapsed();

    let census = check(
        &w,
        &cfg,
        &live,
        &gone,
        reference,
        &baseline,
        "the last wave",
    );
    // Nobody tampers with a pod's rules here: the verifier (1 s) ran, and never "repaired" one.
    let agent_log = std::fs::read_to_string(w.dirs.base.join("agent.log")).unwrap_or_default();
    if !agent_log.contains("drift verifier on") {
        w.violation("the drift verifier did not run".into());
    }
    for l in agent_log
        .lines()
        .filter(|l| l.contains("in-pod capture drifted"))
    {
        w.violation(format!("verifier repaired an untouched pod: {l}"));
    }
    let tally = w.tally.lock().unwrap().clone();
    let violations = w.violations.lock().unwrap().clone();
    println!("{}", summary(&tally, live.len(), &violations, cfg.seed));
    println!(
        "churn took {:.1}s (+{:.1}s checks); agent fds: idle {} / end {} ({} netns)",
        churn_time.as_secs_f64(),
        (started.elapsed() - churn_time).as_secs_f64(),
        baseline.total(),
        census.total(),
        census.netns.len()
    );
    if !violations.is_empty() {
        if let Some(a) = w.agent.lock().unwrap().as_ref() {
            eprintln!("agent log tail:\n{}", a.log_tail(60));
        }
    }
    // Tear down the pods through the chain (leaves no veths, netns or IPAM state).
    for p in live {
        delete(&w, &chain, p);
    }
    for f in Fault::ALL {
        assert!(
            tally.faults.get(&f).copied().unwrap_or(0) > 0,
            "fault {} never injected",
            f.name()
        );
    }
    assert!(
        violations.is_empty(),
        "{} violations (seed {:#x})",
        violations.len(),
        cfg.seed
    );
}

// ---- Timeouts the churn relies on: every plugin command is bounded by timeout_ms ----

const PREV: &str = r#","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.5/24"}]}"#;
const MESH_POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1";

/// A Unix socket that accepts every connection and never says a word.
fn silent_socket(dir: &TempDir) -> PathBuf {
    let path = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    path
}

fn plugin_cmd(cmd: &str, conf: &str, args: &str) -> Exec {
    let env = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ];
    exec_plugin(
        &plugin_bin(),
        &env,
        conf.as_bytes(),
        Duration::from_secs(10),
    )
}

#[test]
fn every_plugin_command_is_bounded_by_timeout_ms_against_a_silent_agent() {
    let dir = TempDir::new("acni-silent");
    let sock = silent_socket(&dir);
    // STATUS asks the agent only when told to (by default it does not dial at all).
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s","type":"ambient-cni","agent_socket":"{}","timeout_ms":300,"status_requires_agent":true{PREV}}}"#,
        sock.display()
    );
    let bound = Duration::from_millis(300 + 1000);
    // DEL never fails, but must not wait longer than the budget either.
    let del = plugin_cmd("DEL", &conf, MESH_POD);
    assert_eq!(del.code, 0, "DEL: {del:?}");
    assert!(del.stdout.is_empty(), "{del:?}");
    assert!(del.elapsed < bound, "DEL took {:?}", del.elapsed);
    for (cmd, code) in [("ADD", 11), ("CHECK", 11), ("STATUS", 50), ("GC", 11)] {
        let out = plugin_cmd(cmd, &conf, MESH_POD);
        out.assert_error(code);
        assert!(out.elapsed < bound, "{cmd} took {:?}", out.elapsed);
    }
}

#[test]
fn out_of_range_timeouts_are_refused_and_the_largest_does_not_overflow() {
    let dir = TempDir::new("acni-tmo");
    let missing = dir.join("missing.sock");
    let conf = |ms: String| {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"k8s","type":"ambient-cni","agent_socket":"{}","timeout_ms":{ms}{PREV}}}"#,
            missing.display()
        )
    };
    // No time at all, or unbounded: an invalid config (7), said at once.
    for ms in ["0".to_owned(), u64::MAX.to_string()] {
        let out = plugin_cmd("ADD", &conf(ms.clone()), MESH_POD);
        out.assert_error(7);
        assert!(
            out.elapsed < Duration::from_secs(2),
            "{ms}: {:?}",
            out.elapsed
        );
    }
    // The largest accepted budget: deadline arithmetic must not overflow (a panic
    // would be exit 101); an absent agent is still a prompt retryable failure.
    let out = plugin_cmd("ADD", &conf("300000".into()), MESH_POD);
    out.assert_error(11);
    assert!(out.elapsed < Duration::from_secs(2), "{:?}", out.elapsed);
}

/// Waits for the node to settle, then checks every invariant; returns the agent's fd census.
fn check(
    w: &World,
    cfg: &ChurnConfig,
    live: &[Pod],
    gone: &[Gone],
    reference: usize,
    baseline: &FdCensus,
    when: &str,
) -> FdCensus {
    let dirs = &w.dirs;
    *w.phase.lock().unwrap() = format!("check after {when}");
    let before = w.violations.lock().unwrap().len();
    // Settle: every live pod enabled in the agent and held by the stand-in.
    let settled = wait_for(Duration::from_secs(30), || {
        let st = agent_status(&dirs.run_dir()).unwrap_or_default();
        let held = w.standin_held();
        live.iter().all(|p| {
            st.get(&p.uid).is_some_and(|s| s.0 == "enabled") && held.get(&p.uid) == Some(&p.inode)
        }) && gone
            .iter()
            .all(|g| !st.contains_key(&g.uid) && !held.contains_key(&g.uid))
    });
    if !settled {
        eprintln!("state did not settle in 30 s; checking anyway");
    }

    let status = agent_status(&dirs.run_dir()).unwrap_or_else(|e| {
        w.violation(format!("status: {e}"));
        HashMap::new()
    });
    let held = w.standin_held();
    let agent_pid = w.agent_pid().expect("agent running");
    let standin_pid = w.standin.lock().unwrap().as_ref().map(ChurnStandin::pid);
    let census = FdCensus::of(agent_pid).unwrap();
    let standin_census = standin_pid
        .and_then(|p| FdCensus::of(p).ok())
        .unwrap_or_default();

    for p in live {
        let lines = ruleset_lines(p.netns.name(), &cfg.backend);
        if lines != reference {
            w.violation(format!(
                "live {} ({}): ruleset has {lines} lines, one application has {reference}",
                p.name, p.uid
            ));
        }
        match held.get(&p.uid) {
            Some(ino) if *ino == p.inode => {}
            other => w.violation(format!(
                "live {}: stand-in holds {other:?}, netns inode is {}",
                p.name, p.inode
            )),
        }
        match status.get(&p.uid) {
            Some((phase, ino, rules_ok)) if phase == "enabled" && *ino == p.inode && *rules_ok => {}
            other => w.violation(format!("live {}: agent status {other:?}", p.name)),
        }
        if !census.netns.contains_key(&p.inode) {
            w.violation(format!("live {}: agent holds no fd of its netns", p.name));
        }
    }
    let live_inodes: HashSet<u64> = live.iter().map(|p| p.inode).collect();
    for g in gone {
        if status.contains_key(&g.uid) {
            w.violation(format!("deleted {}: still in agent status", g.name));
        }
        if held.contains_key(&g.uid) {
            w.violation(format!("deleted {}: still held by the stand-in", g.name));
        }
        if Path::new(&g.netns_path).exists() {
            w.violation(format!("deleted {}: {} still exists", g.name, g.netns_path));
        }
        // Inodes are reused once a netns is freed: only flag one no live pod has.
        if !live_inodes.contains(&g.inode) {
            if census.netns.contains_key(&g.inode) {
                w.violation(format!(
                    "deleted {}: agent still holds net:[{}]",
                    g.name, g.inode
                ));
            }
            if standin_census.netns.contains_key(&g.inode) {
                w.violation(format!(
                    "deleted {}: stand-in still holds net:[{}]",
                    g.name, g.inode
                ));
            }
        }
    }
    // fd leak: netns fds only for live pods (plus the host's: a thread inside a pod netns holds
    // the host's to return to, e.g. the drift verifier reading a pod's rules back); others near
    // baseline.
    let host = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    for ino in census.netns.keys() {
        if !live_inodes.contains(ino) && !baseline.netns.contains_key(ino) && Some(*ino) != host {
            w.violation(format!("agent holds net:[{ino}], which is no live pod's"));
        }
    }
    let allowed = baseline.other + FD_SLACK + NOTIFY_FDS_PER_POD * live.len();
    if census.other > allowed {
        // In-flight work (a plugin exchange the kubelet gave up on) may still hold a
        // socket: a leak is what is still there a while later.
        let first = census.kinds.clone();
        std::thread::sleep(Duration::from_secs(5));
        let again = w
            .agent_pid()
            .and_then(|p| FdCensus::of(p).ok())
            .unwrap_or_default();
        if again.other > allowed {
            w.violation(format!(
                "agent fd leak: {} non-netns fds 5 s apart ({:?} then {:?}), idle baseline {} {:?} \
                 (+{FD_SLACK}, +{NOTIFY_FDS_PER_POD} per live pod: {allowed} allowed)",
                again.other, first, again.kinds, baseline.other, baseline.kinds
            ));
        } else {
            println!(
                "transient agent fds at the check: {first:?}, 5 s later {} (baseline {})",
                again.other, baseline.other
            );
        }
    }
    if !w.conflist_ok() {
        w.violation(format!(
            "conflist lacks our entry at the end: {}",
            std::fs::read_to_string(&w.conf_file).unwrap_or_default()
        ));
    }

    let found = w.violations.lock().unwrap().len() - before;
    println!(
        "check after {when}: {} live, {} deleted, {found} violations",
        live.len(),
        gone.len()
    );
    *w.phase.lock().unwrap() = "churn".into();
    census
}
