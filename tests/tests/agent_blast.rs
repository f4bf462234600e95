//! Blast radius of the agent (issue 15): a failure, a late request or a hostile
//! input concerning one pod never reaches another pod or the agent itself. The
//! real agent with a local pod source, the real plugin and CNI chain, the stand-in.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(15);

/// A temp dir with namespace `mesh` labelled ambient.
fn mesh_dir() -> TempDir {
    let dir = TempDir::new("acni-blast");
    write_namespace(
        &dir.join("pods"),
        "mesh",
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    dir
}

fn standin(dir: &TempDir) -> Standin {
    let s = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
    assert!(
        s.wait_count("snapshot_sent", 1, LONG),
        "stand-in got no snapshot: {:?}",
        s.events()
    );
    s
}

fn inode(ns: &NamedNetns) -> u64 {
    std::fs::metadata(ns.path()).expect("netns file").ino()
}

fn events_for(s: &Standin, kind: &str, uid: &str) -> Vec<Value> {
    s.events_of(kind)
        .into_iter()
        .filter(|e| e["uid"] == uid)
        .collect()
}

/// A sandbox is recreated (new container ID, new netns) and the kubelet's DEL of the
/// old one arrives after the new one's ADD: the pod stays captured in its new netns,
/// ztunnel is never told to drop it; the DEL of the live sandbox releases it.
#[test]
fn a_late_del_of_a_replaced_sandbox_leaves_the_pod_captured() {
    if !require_root("a_late_del_of_a_replaced_sandbox_leaves_the_pod_captured") {
        return;
    }
    let dir = mesh_dir();
    let agent = AgentProcess::start(&dir.0, &["--rules-backend", "nftables"]);
    let zt = standin(&dir);
    let bridge = HostLink(unique("acbr"));
    let chain = Chain::bridge_then(
        "1.0.0",
        &bridge.0,
        "10.98.61.0/24",
        &dir.0,
        plugin_entry(&dir.join("plugin.sock"), 5000),
    );
    let (old_ns, new_ns) = (NamedNetns::new(), NamedNetns::new());
    let uid = format!("{}-web", old_ns.name());
    write_pod(&dir.join("pods"), "mesh", "web", &uid, None, json!({}));
    let old = Attachment {
        container_id: format!("c1-{uid}"),
        ..Attachment::pod(&old_ns.path(), "mesh", "web", &uid)
    };
    let new = Attachment {
        container_id: format!("c2-{uid}"),
        netns: new_ns.path(),
        ..old.clone()
    };
    let old_res = chain
        .add(&old)
        .unwrap_or_else(|(i, e)| panic!("ADD c1 plugin {i}: {e:?}\n{}", agent.log_text()));
    let new_res = chain
        .add(&new)
        .unwrap_or_else(|(i, e)| panic!("ADD c2 plugin {i}: {e:?}\n{}", agent.log_text()));

    // ztunnel got the new netns for the same pod.
    let adds = events_for(&zt, "add", &uid);
    assert_eq!(adds.len(), 2, "{adds:?}");
    assert_eq!(adds[1]["netns_inode"], inode(&new_ns), "{adds:?}");
    assert_eq!(adds[1]["result"], "replaced", "{adds:?}");

    // The late DEL of c1.
    chain.del(&old, Some(&old_res[1])).expect("DEL c1");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        events_for(&zt, "del", &uid).is_empty(),
        "a stale DEL released the live pod: {:?}\n{}",
        zt.events(),
        agent.log_text()
    );
    let to = "10.98.61.1:80";
    let line = ambient_cni_tests::peers::connect_from(&new_ns, to)
        .map(|(_, l)| l)
        .expect("connect from the new sandbox");
    assert!(
        line.contains("port=15001"),
        "still captured, to ztunnel: {line}"
    );

    // The DEL of the live sandbox does release it.
    chain.del(&new, Some(&new_res[1])).expect("DEL c2");
    assert!(
        wait_for(LONG, || !events_for(&zt, "del", &uid).is_empty()),
        "no del: {:?}",
        zt.events()
    );
}

/// Paths that are not a pod's network namespace, as `CNI_NETNS` of a mesh pod:
/// each is a clean CNI error well within a second (the plugin refuses what it can
/// see itself; the host netns is refused by the agent), and the agent stays up.
#[test]
fn bad_netns_paths_from_the_plugin_fail_fast() {
    if !require_root("bad_netns_paths_from_the_plugin_fail_fast") {
        return;
    }
    let dir = mesh_dir();
    let _agent = AgentProcess::start(&dir.0, &["--rules-backend", "nftables"]);
    let _zt = standin(&dir);
    write_pod(&dir.join("pods"), "mesh", "bad", "uid-bad", None, json!({}));
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let file = dir.join("file");
    std::fs::write(&file, b"x").expect("file");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni",
        "agent_socket": dir.join("plugin.sock"), "timeout_ms": 3000,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.98.62.5/24"}]},
    })
    .to_string();
    let paths = [
        fifo.display().to_string(),
        dir.0.display().to_string(),
        file.display().to_string(),
        "/dev/zero".into(),
        "/proc/self/ns/mnt".into(),
        "/proc/self/ns/pid".into(),
        "/proc/self/ns/user".into(),
        // The plugin's own netns is the host's.
        "/proc/self/ns/net".into(),
    ];
    for path in &paths {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c-bad"),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=bad;K8S_POD_UID=uid-bad",
            ),
        ];
        let out = exec_plugin(&plugin_bin(), &env, conf.as_bytes(), LONG);
        let v = out.json();
        assert_eq!(out.code, 1, "{path}: {v}");
        // The plugin refuses what it can see (4); the host's netns only the agent knows (100).
        let want = if path.ends_with("/net") { 100 } else { 4 };
        assert_eq!(v["code"], want, "{path}: {v}");
        assert!(
            v["msg"]
                .as_str()
                .unwrap_or_default()
                .contains(path.as_str())
                || v["details"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(path.as_str()),
            "{path}: the error names the path: {v}"
        );
        assert!(
            out.elapsed < Duration::from_secs(1),
            "{path}: {:?}",
            out.elapsed
        );
    }
    // Still serving.
    let (code, text) = agent_cli(&[
        "status",
        "--run-dir",
        &dir.join("run").display().to_string(),
    ]);
    assert_eq!(code, 0, "{text}");
}

/// Run-dir records naming a FIFO, a directory, a device, another kind of namespace
/// or the host netns: start-up opens none of them blockingly, never holds any as a
/// pod's netns, and gets ready as fast as with no records.
#[test]
fn bad_netns_records_never_hang_start_up() {
    if !require_root("bad_netns_records_never_hang_start_up") {
        return;
    }
    let dir = mesh_dir();
    let records = dir.join("run/pods");
    std::fs::create_dir_all(&records).expect("records dir");
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let file = dir.join("file");
    std::fs::write(&file, b"x").expect("file");
    let paths = [
        fifo.display().to_string(),
        dir.0.display().to_string(),
        file.display().to_string(),
        "/dev/zero".into(),
        "/proc/1/ns/mnt".into(),
        "/proc/1/ns/pid".into(),
        "/proc/1/ns/user".into(),
        "/proc/1/ns/net".into(),
    ];
    for (i, path) in paths.iter().enumerate() {
        let uid = format!("uid-rec-{i}");
        let name = format!("rec{i}");
        let ip = format!("10.98.63.{}", 10 + i);
        write_pod(&dir.join("pods"), "mesh", &name, &uid, Some(&ip), json!({}));
        // The inode of the path itself, so only the kind check can refuse it.
        let ino = std::fs::metadata(path).map(|m| m.ino()).unwrap_or(1);
        let rec = json!({"uid": uid, "namespace": "mesh", "name": name,
            "netns_path": path, "netns_inode": ino});
        std::fs::write(records.join(format!("{uid}.json")), rec.to_string()).expect("record");
    }
    let started = Instant::now();
    let agent = AgentProcess::start(&dir.0, &["--rules-backend", "nftables"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let (code, text) = agent_cli(&[
        "status",
        "--run-dir",
        &dir.join("run").display().to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{text}");
    let v: Value = serde_json::from_str(&text).expect("status JSON");
    for p in v["pods"].as_array().into_iter().flatten() {
        assert_eq!(p["netns_inode"], 0, "no bad path is held as a netns: {p}");
    }
    assert!(
        agent.log_text().contains("recorded netns unusable"),
        "{}",
        agent.log_text()
    );
}

/// The running agent: `no_new_privs`, and exactly its five capabilities effective
/// and in the bounding set (nothing it execs can get more).
#[test]
fn the_agent_runs_with_no_new_privs_and_five_capabilities() {
    if !require_root("the_agent_runs_with_no_new_privs_and_five_capabilities") {
        return;
    }
    let dir = mesh_dir();
    let agent = AgentProcess::start(&dir.0, &["--rules-backend", "nftables"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("{name} missing: {status}"))
    };
    // DAC_OVERRIDE 1, NET_ADMIN 12, NET_RAW 13, SYS_PTRACE 19, SYS_ADMIN 21.
    let keep: u64 = [1, 12, 13, 19, 21].iter().map(|b| 1u64 << b).sum();
    let caps = |name: &str| u64::from_str_radix(&field(name), 16).expect("hex");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(caps("CapEff:"), keep, "{status}");
    assert_eq!(caps("CapPrm:"), keep, "{status}");
    assert_eq!(caps("CapBnd:"), keep, "{status}");
    assert_eq!(caps("CapInh:"), 0, "{status}");
}

/// SIGTERM at any moment of the agent's start (it may already have touched the host:
/// the probe set, the sockets) takes the stop path and exits 0; only a SIGTERM before
/// it began starting may end it by the default action. Before the signal was caught
/// first thing, one landing between two listeners was lost and the agent ran on until
/// SIGKILL, leaving the host's probe table behind at an uninstall.
#[test]
fn sigterm_while_starting_takes_the_stop_path() {
    use std::os::unix::process::ExitStatusExt;
    if !require_root("sigterm_while_starting_takes_the_stop_path") {
        return;
    }
    let dir = mesh_dir();
    let empty_proc = dir.join("proc");
    std::fs::create_dir_all(&empty_proc).expect("proc dir");
    let proc_arg = empty_proc.display().to_string();
    let mut stopped = 0;
    for (round, delay_ms) in [0u64, 1, 2, 5, 10, 20, 40, 80, 150].iter().enumerate() {
        let round_dir = dir.join(&format!("r{round}"));
        std::fs::create_dir_all(round_dir.join("pods")).expect("dir");
        // An empty /proc: no kubelet found, so the host's probe table is never touched.
        let mut agent = AgentProcess::spawn(&round_dir, &["--host-proc", &proc_arg]);
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let st = agent.terminate(Duration::from_secs(10));
        let log = agent.log_text();
        let st = st.unwrap_or_else(|| {
            panic!("SIGTERM {delay_ms} ms after exec: still running after 10 s\n{log}")
        });
        if st.success() {
            assert!(
                log.contains("stopped (in-pod rules stay in place)"),
                "exit 0 without the stop path\n{log}"
            );
            assert!(
                !round_dir.join("plugin.sock").exists(),
                "the plugin socket is left"
            );
            stopped += 1;
        } else {
            assert_eq!(
                st.signal(),
                Some(15),
                "SIGTERM {delay_ms} ms after exec: {st:?}\n{log}"
            );
            assert!(
                !log.contains("starting ambient-cni-agent"),
                "killed by SIGTERM after it began starting\n{log}"
            );
        }
    }
    assert!(stopped > 0, "no round reached the stop path");
}
