//! The node agent end to end: real netns pods through the real CNI chain
//! (bridge + host-local + ambient-cni), the agent process with a local pod
//! source, and the ztunnel stand-in on the ZDS socket.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use iptables_rules::netns::Netns;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(15);

/// One agent + stand-in + namespace `mesh` labelled ambient.
struct Mesh {
    dir: TempDir,
    agent: Option<AgentProcess>,
    standin: Option<Standin>,
    subnet: u8,
    bridge: HostLink,
}

impl Mesh {
    fn new(backend: &'static str, subnet: u8, standin_flags: &[&str]) -> Self {
        let dir = TempDir::new("acni-e2e");
        write_namespace(
            &dir.join("pods"),
            "mesh",
            json!({"istio.io/dataplane-mode": "ambient"}),
        );
        write_namespace(&dir.join("pods"), "plain", json!({}));
        // The drift verifier off: a test here breaks a pod's rules on purpose and reads them back.
        let agent = AgentProcess::start(
            &dir.0,
            &["--rules-backend", backend, "--verify-interval", "0"],
        );
        let standin = Standin::start(
            &dir.join("ztunnel.sock"),
            &dir.join("standin.jsonl"),
            standin_flags,
        );
        assert!(
            standin.wait_count("snapshot_sent", 1, LONG),
            "stand-in got no snapshot: {:?}",
            standin.events()
        );
        Self {
            dir,
            agent: Some(agent),
            standin: Some(standin),
            subnet,
            bridge: HostLink(unique("acbr")),
        }
    }

    fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent")
    }

    fn standin(&self) -> &Standin {
        self.standin.as_ref().expect("standin")
    }

    fn chain(&self, timeout_ms: u64) -> Chain {
        Chain::bridge_then(
            "1.0.0",
            &self.bridge.0,
            &format!("10.98.{}.0/24", self.subnet),
            &self.dir.0,
            plugin_entry(&self.dir.join("plugin.sock"), timeout_ms),
        )
    }

    fn gateway(&self) -> String {
        format!("10.98.{}.1", self.subnet)
    }

    /// Writes the pod object, then runs the chain ADD for it in a fresh netns.
    fn add_pod(
        &self,
        ns: &str,
        name: &str,
    ) -> (NamedNetns, Attachment, Result<Vec<Value>, (usize, Exec)>) {
        let netns = NamedNetns::new();
        let uid = format!("{}-{name}", netns.name());
        write_pod(&self.dir.join("pods"), ns, name, &uid, None, json!({}));
        let att = Attachment::pod(&netns.path(), ns, name, &uid);
        let res = self.chain(5000).add(&att);
        (netns, att, res)
    }
}

fn uid_of(att: &Attachment) -> String {
    att.args
        .rsplit("K8S_POD_UID=")
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn inode(ns: &NamedNetns) -> u64 {
    std::fs::metadata(ns.path()).expect("netns file").ino()
}

fn listening(ns: &NamedNetns) -> Vec<u16> {
    let out = ns.exec(&["ss", "-Hltn"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ports: Vec<u16> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.rsplit(':').next()?.parse().ok())
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// Connects from inside `ns` to `to` and returns the first line the server says.
fn connect_from(ns: &NamedNetns, to: &str) -> Result<String, String> {
    let h = Netns::open(Path::new(&ns.path()), None).map_err(|e| e.to_string())?;
    let to: SocketAddr = to.parse().map_err(|e| format!("{e}"))?;
    h.run(move || {
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_owned())
    })
    .map_err(|e| e.to_string())?
}

fn rules_count(ns: &NamedNetns, backend: &str) -> usize {
    if backend == "nftables" {
        let out = ns.exec(&["nft", "list", "tables"]);
        String::from_utf8_lossy(&out.stdout)
            .matches("istio-ambient-nat")
            .count()
    } else {
        let out = ns.exec(&["iptables-save", "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| *l == "-A PREROUTING -j ISTIO_PRERT")
            .count()
    }
}

fn captured_then_released(backend: &'static str, subnet: u8) {
    let mesh = Mesh::new(backend, subnet, &[]);
    let (pod, att, res) = mesh.add_pod("mesh", "web");
    let results = res.unwrap_or_else(|(i, e)| {
        panic!("ADD plugin {i}: {e:?}\nagent: {}", mesh.agent().log_text())
    });
    assert_eq!(results[1], results[0], "output is the prevResult");
    let uid = uid_of(&att);

    // ztunnel (stand-in) got the pod with an fd of its very netns.
    let adds: Vec<Value> = mesh
        .standin()
        .events_of("add")
        .into_iter()
        .filter(|e| e["uid"] == uid.as_str())
        .collect();
    assert_eq!(adds.len(), 1, "{adds:?}");
    assert_eq!(adds[0]["netns_inode"], inode(&pod));
    assert_eq!(adds[0]["namespace"], "mesh");
    assert_eq!(adds[0]["service_account"], "sa-web");
    assert_eq!(rules_count(&pod, backend), 1, "rules installed once");
    let ports = listening(&pod);
    for p in [15001, 15006, 15008] {
        assert!(
            ports.contains(&p),
            "stand-in listens on {p} in the pod: {ports:?}"
        );
    }
    // The pod's outbound TCP lands on the proxy with its original destination.
    let to = format!("{}:80", mesh.gateway());
    let line = connect_from(&pod, &to).expect("connect");
    assert!(
        line.contains("port=15001") && line.contains(&format!("orig={to}")),
        "{line}"
    );

    // DEL: ztunnel is told, its listeners go.
    let chain = mesh.chain(5000);
    chain.del(&att, Some(&results[1])).expect("DEL");
    assert!(
        wait_for(LONG, || mesh.standin().events().iter().any(|e| (e
            ["event"]
            == "del"
            || e["event"] == "drained")
            && e["uid"] == uid.as_str())),
        "no del: {:?}",
        mesh.standin().events()
    );
    assert!(
        wait_for(LONG, || listening(&pod).is_empty()),
        "{:?}",
        listening(&pod)
    );
}

#[test]
fn captured_pod_reaches_the_proxy_and_del_releases_it_iptables() {
    if require_root("captured_pod_reaches_the_proxy_and_del_releases_it_iptables") {
        captured_then_released("iptables", 41);
    }
}

#[test]
fn captured_pod_reaches_the_proxy_and_del_releases_it_nftables() {
    if require_root("captured_pod_reaches_the_proxy_and_del_releases_it_nftables") {
        captured_then_released("nftables", 42);
    }
}

#[test]
fn pod_outside_the_mesh_is_not_touched() {
    if !require_root("pod_outside_the_mesh_is_not_touched") {
        return;
    }
    let mesh = Mesh::new("nftables", 43, &[]);
    let (pod, _att, res) = mesh.add_pod("plain", "web");
    res.unwrap_or_else(|(i, e)| panic!("ADD plugin {i}: {e:?}"));
    assert_eq!(rules_count(&pod, "nftables"), 0);
    assert!(mesh.standin().events_of("add").is_empty());
}

#[test]
fn agent_kill_9_and_restart_resends_a_full_snapshot() {
    if !require_root("agent_kill_9_and_restart_resends_a_full_snapshot") {
        return;
    }
    let mut mesh = Mesh::new("nftables", 44, &[]);
    let mut pods = Vec::new();
    for i in 0..20 {
        let (ns, att, res) = mesh.add_pod("mesh", &format!("p{i}"));
        res.unwrap_or_else(|(i, e)| panic!("ADD {i}: {e:?}\n{}", mesh.agent().log_text()));
        pods.push((ns, att));
    }
    assert_eq!(mesh.standin().events_of("add").len(), 20);
    if let Some(a) = mesh.agent.as_mut() {
        a.kill();
    }
    // Rules live in the pods: still there while the agent is down.
    assert!(pods.iter().all(|(ns, _)| rules_count(ns, "nftables") == 1));
    // Two pods are deleted while the agent is down.
    for (_, att) in &pods[18..] {
        let name = att
            .args
            .split("K8S_POD_NAME=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .unwrap_or_default();
        delete_pod(&mesh.dir.join("pods"), &format!("mesh_{name}"));
    }
    let snapshots_before = mesh.standin().events_of("snapshot_sent").len();
    let agent = AgentProcess::start(&mesh.dir.0, &["--rules-backend", "nftables"]);
    mesh.agent = Some(agent);
    assert!(
        mesh.standin()
            .wait_count("snapshot_sent", snapshots_before + 1, LONG),
        "{}",
        mesh.agent().log_text()
    );
    // The snapshot of the new connection: the 18 live pods, each with its own netns.
    let events = mesh.standin().events();
    let last_connect = events
        .iter()
        .rposition(|e| e["event"] == "connected")
        .expect("connected");
    let snapshot: Vec<&Value> = events[last_connect..]
        .iter()
        .filter(|e| e["event"] == "add" && e["phase"] == "snapshot")
        .collect();
    assert_eq!(snapshot.len(), 18, "{snapshot:?}");
    for (ns, att) in &pods[..18] {
        let uid = uid_of(att);
        let e = snapshot
            .iter()
            .find(|e| e["uid"] == uid.as_str())
            .unwrap_or_else(|| panic!("{uid} missing"));
        assert_eq!(e["netns_inode"], inode(ns), "{uid}");
        assert_eq!(e["result"], "noop", "ztunnel keeps the same proxy");
    }
    let after: Vec<&Value> = events[last_connect..]
        .iter()
        .filter(|e| e["event"] == "snapshot_sent")
        .collect();
    assert_eq!(after.len(), 1, "exactly one SnapshotSent per connection");
    // The two deleted pods are drained by ztunnel, and rules were not duplicated.
    for (_, att) in &pods[18..] {
        let uid = uid_of(att);
        assert!(
            mesh.standin()
                .events()
                .iter()
                .any(|e| e["event"] == "drained" && e["uid"] == uid.as_str()),
            "{uid} not drained"
        );
    }
    assert!(pods[..18]
        .iter()
        .all(|(ns, _)| rules_count(ns, "nftables") == 1));
}

#[test]
fn standin_restart_gets_the_full_snapshot() {
    if !require_root("standin_restart_gets_the_full_snapshot") {
        return;
    }
    let mut mesh = Mesh::new("iptables", 45, &[]);
    let mut pods = Vec::new();
    for i in 0..3 {
        let (ns, att, res) = mesh.add_pod("mesh", &format!("s{i}"));
        res.unwrap_or_else(|(i, e)| panic!("ADD {i}: {e:?}"));
        pods.push((ns, att));
    }
    mesh.standin = None;
    let second = Standin::start(
        &mesh.dir.join("ztunnel.sock"),
        &mesh.dir.join("standin2.jsonl"),
        &[],
    );
    assert!(second.wait_count("snapshot_sent", 1, LONG));
    let adds = second.events_of("add");
    assert_eq!(adds.len(), 3, "{adds:?}");
    for (ns, att) in &pods {
        let uid = uid_of(att);
        assert!(adds
            .iter()
            .any(|e| e["uid"] == uid.as_str() && e["netns_inode"] == inode(ns)));
    }
}

#[test]
fn nack_fails_the_add_and_a_retry_succeeds() {
    if !require_root("nack_fails_the_add_and_a_retry_succeeds") {
        return;
    }
    let mut mesh = Mesh::new("nftables", 46, &["--nack-all"]);
    let (pod, att, res) = mesh.add_pod("mesh", "web");
    let (idx, exec) = res.expect_err("ztunnel nacked: ADD must fail");
    assert_eq!(idx, 1);
    let v = exec.assert_error(11);
    assert!(
        v["msg"].as_str().unwrap_or_default().contains("ztunnel"),
        "{v}"
    );
    // The runtime cleans up the failed sandbox and retries; a healthy ztunnel takes it.
    let chain = mesh.chain(5000);
    chain.del(&att, None).expect("DEL");
    mesh.standin = Some(Standin::start(
        &mesh.dir.join("ztunnel.sock"),
        &mesh.dir.join("standin-ok.jsonl"),
        &[],
    ));
    // Only the new stand-in may be connected.
    std::thread::sleep(Duration::from_millis(200));
    let results = chain
        .add(&att)
        .unwrap_or_else(|(i, e)| panic!("retry ADD {i}: {e:?}\n{}", mesh.agent().log_text()));
    assert_eq!(results[1], results[0]);
    assert_eq!(
        rules_count(&pod, "nftables"),
        1,
        "not duplicated by the retry"
    );
    let line = connect_from(&pod, &format!("{}:80", mesh.gateway())).expect("connect");
    assert!(line.contains("port=15001"), "{line}");
}

#[test]
fn stalled_ztunnel_fails_the_add_within_the_plugin_timeout() {
    if !require_root("stalled_ztunnel_fails_the_add_within_the_plugin_timeout") {
        return;
    }
    let dir = TempDir::new("acni-stall");
    write_namespace(
        &dir.join("pods"),
        "mesh",
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let _agent = AgentProcess::start(&dir.0, &["--rules-backend", "nftables"]);
    let standin = Standin::start(
        &dir.join("ztunnel.sock"),
        &dir.join("standin.jsonl"),
        &["--stall-after", "1"],
    );
    assert!(standin.wait_count("snapshot_sent", 1, LONG));
    let bridge = HostLink(unique("acbr"));
    let chain = Chain::bridge_then(
        "1.0.0",
        &bridge.0,
        "10.98.47.0/24",
        &dir.0,
        plugin_entry(&dir.join("plugin.sock"), 5000),
    );
    let netns = NamedNetns::new();
    write_pod(
        &dir.join("pods"),
        "mesh",
        "slow",
        "uid-slow",
        None,
        json!({}),
    );
    let att = Attachment::pod(&netns.path(), "mesh", "slow", "uid-slow");
    let (_, exec) = chain.add(&att).expect_err("stalled ztunnel");
    exec.assert_error(11);
    assert!(
        exec.elapsed < Duration::from_millis(5500),
        "{:?}",
        exec.elapsed
    );
    chain.del(&att, None).expect("DEL");
}

#[test]
fn oversized_zds_message_is_refused_before_sending() {
    if !require_root("oversized_zds_message_is_refused_before_sending") {
        return;
    }
    let mesh = Mesh::new("nftables", 48, &[]);
    // A 1100-byte service account pushes the AddWorkload past 1024 bytes.
    let netns = NamedNetns::new();
    let uid = format!("{}-big", netns.name());
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "mesh", "name": "big", "uid": uid},
        "spec": {"serviceAccountName": "s".repeat(1100), "containers": []},
        "status": {"phase": "Running"},
    });
    pod["metadata"]["labels"] = json!({});
    std::fs::write(mesh.dir.join("pods/pods/mesh_big.json"), pod.to_string()).expect("write pod");
    let att = Attachment::pod(&netns.path(), "mesh", "big", &uid);
    let (_, exec) = mesh.chain(5000).add(&att).expect_err("too large");
    exec.assert_error(11);
    assert!(
        exec.stdout.contains("1024") || exec.stdout.contains("large"),
        "{}",
        exec.stdout
    );
    assert!(
        mesh.standin().events_of("add").is_empty(),
        "nothing reached ztunnel"
    );
    // The connection is intact: a normal pod still works.
    let (_ns, _att, res) = mesh.add_pod("mesh", "small");
    res.unwrap_or_else(|(i, e)| panic!("ADD {i}: {e:?}"));
    mesh.chain(5000).del(&att, None).expect("DEL");
}

#[test]
fn status_and_doctor_name_each_broken_link() {
    if !require_root("status_and_doctor_name_each_broken_link") {
        return;
    }
    let mut mesh = Mesh::new("nftables", 49, &[]);
    let run = mesh.dir.join("run");
    let run = run.to_str().expect("utf8");
    let (pod, _att, res) = mesh.add_pod("mesh", "web");
    res.unwrap_or_else(|(i, e)| panic!("ADD {i}: {e:?}"));

    let (code, text) = agent_cli(&["status", "--run-dir", run, "--json"]);
    assert_eq!(code, 0, "{text}");
    let v: Value = serde_json::from_str(&text).expect("status JSON");
    assert_eq!(v["ztunnel_connections"], 1);
    assert_eq!(v["pods"][0]["name"], "web");
    assert_eq!(v["pods"][0]["phase"], "enabled");
    assert_eq!(v["pods"][0]["rules_ok"], true);
    assert_eq!(v["pods"][0]["netns_inode"], inode(&pod));

    let (code, text) = agent_cli(&["doctor", "mesh/web", "--run-dir", run]);
    assert_eq!(code, 0, "{text}");
    for ok in [
        "[PASS] selected for the mesh",
        "[PASS] netns found",
        "[PASS] in-pod rules",
        "[PASS] policy route",
        "[PASS] ztunnel acked",
    ] {
        assert!(text.contains(ok), "{ok}: {text}");
    }

    // Outside the mesh: healthy, and says why and how to change it.
    let (_p2, _a2, r2) = mesh.add_pod("plain", "db");
    r2.unwrap_or_else(|(i, e)| panic!("ADD {i}: {e:?}"));
    let (code, text) = agent_cli(&["doctor", "plain/db", "--run-dir", run]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("no enablement selector matches") && text.contains("kubectl label ns plain"),
        "{text}"
    );

    // Unknown pod.
    let (code, text) = agent_cli(&["doctor", "mesh/nope", "--run-dir", run]);
    assert_eq!(code, 1);
    assert!(text.contains("[FAIL] pod known"), "{text}");

    // Break the rules by hand: doctor names the rules.
    let (code, text) = agent_cli(&[
        "redirect",
        "remove",
        "--netns",
        &pod.path(),
        "--backend",
        "nftables",
    ]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = agent_cli(&["doctor", "mesh/web", "--run-dir", run]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("[FAIL] in-pod rules") && text.contains("[FAIL] policy route"),
        "{text}"
    );
    let (_, text) = agent_cli(&["status", "--run-dir", run]);
    assert!(text.contains("MISSING"), "{text}");
    let (code, text) = agent_cli(&[
        "redirect",
        "apply",
        "--netns",
        &pod.path(),
        "--backend",
        "nftables",
    ]);
    assert_eq!(code, 0, "{text}");

    // ztunnel gone: doctor names it.
    mesh.standin = None;
    assert!(wait_for(LONG, || agent_cli(&[
        "status",
        "--run-dir",
        run,
        "--json"
    ])
    .1
    .contains("\"ztunnel_connections\": 0")));
    let (code, text) = agent_cli(&["doctor", "mesh/web", "--run-dir", run]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("[PASS] in-pod rules") && text.contains("[FAIL] ztunnel connected"),
        "{text}"
    );

    // Log level at run time.
    let (code, text) = agent_cli(&["log-level", "debug", "--run-dir", run]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("was"), "{text}");
    let (code, _) = agent_cli(&["log-level", "[[bad", "--run-dir", run]);
    assert_ne!(code, 0);
}

#[test]
fn namespace_label_enrols_running_pods_without_cni() {
    use ambient_cni_tests::kubelet::{pod_uid, RunningPod};
    if !require_root("namespace_label_enrols_running_pods_without_cni") {
        return;
    }
    let mesh = Mesh::new("nftables", 50, &[]);
    let pods_dir = mesh.dir.join("pods");
    let tag = std::process::id();
    let a = RunningPod::start(&pod_uid(tag, 1), "10.96.50.11");
    let b = RunningPod::start(&pod_uid(tag, 2), "10.96.50.12");
    write_pod(&pods_dir, "plain", "a", &a.uid, Some(&a.ip), json!({}));
    write_pod(&pods_dir, "plain", "b", &b.uid, Some(&b.ip), json!({}));
    // A hostNetwork pod in the same namespace must never be touched.
    let host_uid = pod_uid(tag, 3);
    let host_pod = json!({
        "metadata": {"namespace": "plain", "name": "h", "uid": host_uid},
        "spec": {"hostNetwork": true, "containers": []},
        "status": {"phase": "Running", "podIP": "10.96.50.13"},
    });
    std::fs::write(pods_dir.join("pods/plain_h.json"), host_pod.to_string()).expect("write");
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        mesh.standin().events_of("add").is_empty(),
        "nothing is in the mesh yet"
    );

    // Label the namespace: its running pods join, found by the /proc scan, no CNI call.
    write_namespace(
        &pods_dir,
        "plain",
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let added = |uid: &str| {
        mesh.standin()
            .events_of("add")
            .iter()
            .any(|e| e["uid"] == uid)
    };
    assert!(
        wait_for(LONG, || added(&a.uid) && added(&b.uid)),
        "{}",
        mesh.agent().log_text()
    );
    for p in [&a, &b] {
        let e = mesh
            .standin()
            .events_of("add")
            .into_iter()
            .find(|e| e["uid"] == p.uid.as_str())
            .expect("add");
        assert_eq!(e["netns_inode"], inode(&p.netns), "the right netns");
        assert_eq!(rules_count(&p.netns, "nftables"), 1);
    }
    let line = connect_from(&a.netns, "10.96.50.1:80").expect("connect");
    assert!(
        line.contains("port=15001") && line.contains("orig=10.96.50.1:80"),
        "{line}"
    );
    assert!(!added(&host_uid), "hostNetwork pod never touched");

    // Pod labelled `none`: released (rules out of its netns, ztunnel told).
    write_pod(
        &pods_dir,
        "plain",
        "b",
        &b.uid,
        Some(&b.ip),
        json!({"istio.io/dataplane-mode": "none"}),
    );
    let deleted = |uid: &str| {
        mesh.standin()
            .events()
            .iter()
            .any(|e| (e["event"] == "del" || e["event"] == "drained") && e["uid"] == uid)
    };
    assert!(
        wait_for(LONG, || deleted(&b.uid)),
        "{}",
        mesh.agent().log_text()
    );
    assert!(wait_for(LONG, || rules_count(&b.netns, "nftables") == 0));
    assert_eq!(
        rules_count(&a.netns, "nftables"),
        1,
        "the other pod keeps its rules"
    );

    // Namespace label removed: the rest is released too.
    write_namespace(&pods_dir, "plain", json!({}));
    assert!(
        wait_for(LONG, || deleted(&a.uid)),
        "{}",
        mesh.agent().log_text()
    );
    assert!(wait_for(LONG, || rules_count(&a.netns, "nftables") == 0));
    let (_, text) = agent_cli(&[
        "status",
        "--run-dir",
        mesh.dir.join("run").to_str().expect("utf8"),
        "--json",
    ]);
    assert!(!text.contains(&host_uid), "{text}");
}
