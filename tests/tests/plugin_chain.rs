//! The real plugin binary chained after Debian's bridge + host-local, exec'd
//! exactly as libcni does, for every supported `cniVersion`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use serde_json::Value;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The pod's eth0 addresses as `ip -j addr` reports them inside its netns.
fn pod_addrs(ns: &NamedNetns) -> Vec<String> {
    let out = ns.exec(&["ip", "-j", "addr", "show", "dev", "eth0"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| Some(format!("{}/{}", i["local"].as_str()?, i["prefixlen"])))
                .collect()
        })
        .unwrap_or_default()
}

fn chain_for(version: &str, idx: u8, entry: Value, ipam: &TempDir) -> (Chain, HostLink) {
    let bridge = unique("acbr");
    let chain = Chain::bridge_then(
        version,
        &bridge,
        &format!("10.99.{idx}.0/24"),
        &ipam.0,
        entry,
    );
    (chain, HostLink(bridge))
}

#[test]
fn chains_after_bridge_for_every_version() {
    if !require_root("chains_after_bridge_for_every_version") {
        return;
    }
    let dir = TempDir::new("acni-chain");
    // The pod exists but its namespace is not in the mesh: the agent answers "not in mesh".
    write_pod(
        &dir.join("pods"),
        "shop",
        "web-0",
        "uid-web-0",
        None,
        serde_json::json!({}),
    );
    let agent = AgentProcess::start(&dir.0, &[]);
    let sock = agent.socket.clone();
    for (i, version) in VERSIONS.iter().enumerate() {
        let ns = NamedNetns::new();
        let (chain, _bridge) = chain_for(version, 10 + i as u8, plugin_entry(&sock, 2000), &dir);
        let att = Attachment::pod(&ns.path(), "shop", "web-0", &format!("uid-{i}"));
        let results = chain
            .add(&att)
            .unwrap_or_else(|(i, e)| panic!("{version}: plugin {i} failed: {e:?}"));
        let (bridge_out, ours) = (&results[0], &results[1]);
        assert_eq!(ours, bridge_out, "{version}: output must be the prevResult");
        assert_eq!(ours["cniVersion"], *version);
        let legacy = version.starts_with("0.");
        for ip in ours["ips"].as_array().expect("ips") {
            assert_eq!(ip.get("version").is_some(), legacy, "{version}: {ip}");
        }
        // The bridge really configured the pod; we passed its result through.
        let addr = ours["ips"][0]["address"].as_str().expect("address");
        assert!(
            pod_addrs(&ns).contains(&addr.to_owned()),
            "{version}: {addr} not on eth0"
        );
        if *version != "0.3.0" && *version != "0.3.1" {
            chain
                .check(&att, ours)
                .unwrap_or_else(|(i, e)| panic!("{version}: CHECK plugin {i}: {e:?}"));
        }
        for round in 0..2 {
            chain
                .del(&att, Some(ours))
                .unwrap_or_else(|(i, e)| panic!("{version}: DEL #{round} plugin {i}: {e:?}"));
        }
    }
}

#[test]
fn agent_down_fails_closed_but_pass_through_works() {
    if !require_root("agent_down_fails_closed_but_pass_through_works") {
        return;
    }
    let dir = TempDir::new("acni-down");
    let sock = dir.join("absent.sock");
    let timeout_ms = 400;
    for (i, version) in VERSIONS.iter().enumerate() {
        let ns = NamedNetns::new();
        let (chain, _bridge) =
            chain_for(version, 20 + i as u8, plugin_entry(&sock, timeout_ms), &dir);
        // A pod that must be asked: ADD fails with 11, well within the budget.
        let att = Attachment::pod(&ns.path(), "shop", "web-0", "u1");
        let (idx, exec) = chain.add(&att).expect_err("ADD must fail closed");
        assert_eq!(idx, 1, "the bridge succeeded, ours failed");
        exec.assert_error(11);
        assert!(
            exec.elapsed < Duration::from_millis(timeout_ms + 1000),
            "{:?}",
            exec.elapsed
        );
        // The runtime cleans up with DEL, which never fails.
        chain.del(&att, None).expect("DEL with agent down");
        // A pod named like the agent's is no exemption (the agent runs with hostNetwork and
        // never reaches CNI; a name-based exemption would be a capture bypass).
        let att = Attachment {
            args:
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ambient-cni-node-x7k2p"
                    .into(),
            ..Attachment::pod(&ns.path(), "x", "y", "u3")
        };
        let (idx, exec) = chain
            .add(&att)
            .expect_err("agent-named pod must fail closed");
        assert_eq!(idx, 1);
        exec.assert_error(11);
        chain.del(&att, None).expect("DEL");
        // Pass-through pods need no agent.
        for args in [
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns",
            "IgnoreUnknown=1",
        ] {
            let att = Attachment {
                args: args.into(),
                ..Attachment::pod(&ns.path(), "x", "y", "u2")
            };
            let results = chain
                .add(&att)
                .unwrap_or_else(|(i, e)| panic!("{version} {args}: plugin {i}: {e:?}"));
            assert_eq!(results[1], results[0]);
            chain.del(&att, Some(&results[1])).expect("DEL");
        }
    }
}

// ---- bad input: every case gets the right code and nothing but the error JSON ----

fn conf(extra: &str) -> String {
    format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambient-cni"{extra}}}"#)
}

const PREV: &str = r#","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]}"#;

fn add_env<'a>(netns: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ]
}

fn run(env: &[(&str, &str)], stdin: &[u8]) -> Exec {
    exec_plugin(&plugin_bin(), env, stdin, Duration::from_secs(10))
}

const NS: &str = "/proc/self/ns/net";
const MESH_POD: &str = "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";

#[test]
fn bad_input_gets_the_right_error() {
    let sock = format!(r#","agent_socket":"/nonexistent/acni.sock","timeout_ms":300{PREV}"#);
    let good = conf(&sock);
    let garbage: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let no_type = r#"{"cniVersion":"1.0.0","name":"k8s"}"#.to_owned();
    let no_name = r#"{"cniVersion":"1.0.0","type":"ambient-cni"}"#.to_owned();
    let bad_version = r#"{"cniVersion":"0.2.0","name":"k","type":"ambient-cni"}"#.to_owned();
    let no_prev = conf("");
    let bad_prev = conf(r#","prevResult":{"ips":[{"address":"nonsense"}]}"#);
    let prev_not_obj = conf(r#","prevResult":[1]"#);
    let empty_socket = conf(&format!(r#","agent_socket":""{PREV}"#));
    /// (what, env, stdin, expected code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u64);
    let cases: Vec<Case> = vec![
        ("not JSON", add_env(NS, MESH_POD), b"{nope".to_vec(), 6),
        ("empty stdin", add_env(NS, MESH_POD), Vec::new(), 6),
        ("10 MiB of garbage", add_env(NS, MESH_POD), garbage, 6),
        ("no type", add_env(NS, MESH_POD), no_type.into_bytes(), 7),
        ("no name", add_env(NS, MESH_POD), no_name.into_bytes(), 7),
        (
            "unknown cniVersion",
            add_env(NS, MESH_POD),
            bad_version.into_bytes(),
            1,
        ),
        (
            "prevResult missing",
            add_env(NS, MESH_POD),
            no_prev.into_bytes(),
            7,
        ),
        (
            "prevResult malformed",
            add_env(NS, MESH_POD),
            bad_prev.into_bytes(),
            6,
        ),
        (
            "prevResult not an object",
            add_env(NS, MESH_POD),
            prev_not_obj.into_bytes(),
            6,
        ),
        (
            "CNI_COMMAND missing",
            add_env(NS, MESH_POD)[1..].to_vec(),
            good.clone().into_bytes(),
            4,
        ),
        (
            "CNI_COMMAND unknown",
            [
                vec![("CNI_COMMAND", "FROB")],
                add_env(NS, MESH_POD)[1..].to_vec(),
            ]
            .concat(),
            good.clone().into_bytes(),
            4,
        ),
        (
            "CNI_NETNS missing",
            add_env(NS, MESH_POD)
                .into_iter()
                .filter(|(k, _)| *k != "CNI_NETNS")
                .collect(),
            good.clone().into_bytes(),
            4,
        ),
        (
            "CNI_NETNS nowhere",
            add_env("/var/run/netns/acni-absent", MESH_POD),
            good.clone().into_bytes(),
            4,
        ),
        (
            "CNI_NETNS not a netns",
            add_env("/etc/hostname", MESH_POD),
            good.clone().into_bytes(),
            4,
        ),
        (
            "CNI_ARGS malformed",
            add_env(NS, "K8S_POD_NAME"),
            good.clone().into_bytes(),
            4,
        ),
        (
            "agent socket missing",
            add_env(NS, MESH_POD),
            good.clone().into_bytes(),
            11,
        ),
        (
            "agent socket empty",
            add_env(NS, MESH_POD),
            empty_socket.into_bytes(),
            7,
        ),
    ];
    for (what, env, stdin, code) in cases {
        let out = run(&env, &stdin);
        let v = out.assert_error(code);
        assert!(
            out.elapsed < Duration::from_secs(5),
            "{what}: took {:?}",
            out.elapsed
        );
        eprintln!("{what}: {v}");
    }
}

#[test]
fn agent_that_never_answers_times_out_with_11() {
    let dir = TempDir::new("acni-hang");
    let path = dir.join("hang.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    // Accept and hold every connection, never answering.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let stdin = conf(&format!(
        r#","agent_socket":"{}","timeout_ms":300{PREV}"#,
        path.display()
    ));
    let out = run(&add_env(NS, MESH_POD), stdin.as_bytes());
    let v = out.assert_error(11);
    assert!(
        v["msg"].as_str().unwrap_or_default().contains("300 ms"),
        "{v}"
    );
    assert!(
        out.elapsed < Duration::from_millis(1300),
        "{:?}",
        out.elapsed
    );
}

#[test]
fn agent_that_answers_garbage_is_a_protocol_error() {
    use std::io::Write;
    let dir = TempDir::new("acni-garbage");
    let path = dir.join("garbage.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n\x00\xff garbage garbage garbage");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let stdin = conf(&format!(
        r#","agent_socket":"{}","timeout_ms":2000{PREV}"#,
        path.display()
    ));
    let out = run(&add_env(NS, MESH_POD), stdin.as_bytes());
    out.assert_error(101);
    assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
}

#[test]
fn version_status_gc_and_version_gating() {
    let dir = TempDir::new("acni-cmds");
    let agent = AgentProcess::start(&dir.0, &[]);
    let sock = agent.socket.clone();
    let out = run(&[("CNI_COMMAND", "VERSION")], b"");
    assert_eq!(out.code, 0);
    assert_eq!(
        out.json()["supportedVersions"].as_array().map(Vec::len),
        Some(5)
    );

    let v11 = |extra: &str| {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"k","type":"ambient-cni","agent_socket":"{}"{extra}}}"#,
            sock.display()
        )
    };
    let status = run(&[("CNI_COMMAND", "STATUS")], v11("").as_bytes());
    assert_eq!(
        (status.code, status.stdout.as_str()),
        (0, ""),
        "{}",
        status.stderr
    );
    let gc = v11(r#","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]"#);
    let out = run(&[("CNI_COMMAND", "GC")], gc.as_bytes());
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let bad_gc = v11(r#","cni.dev/valid-attachments":[{"ifname":"eth0"}]"#);
    run(&[("CNI_COMMAND", "GC")], bad_gc.as_bytes()).assert_error(7);

    // STATUS and GC exist from 1.1.0 on, CHECK from 0.4.0 on.
    let old = r#"{"cniVersion":"1.0.0","name":"k","type":"ambient-cni"}"#;
    run(&[("CNI_COMMAND", "STATUS")], old.as_bytes()).assert_error(1);
    run(&[("CNI_COMMAND", "GC")], old.as_bytes()).assert_error(1);
    let v031 = r#"{"cniVersion":"0.3.1","name":"k","type":"ambient-cni"}"#;
    let mut env = add_env(NS, MESH_POD);
    env[0] = ("CNI_COMMAND", "CHECK");
    run(&env, v031.as_bytes()).assert_error(1);

    // STATUS with no agent: ready by default (the node must not go NotReady), 50 when the
    // conf opts in; a running agent is ready either way.
    let absent = r#"{"cniVersion":"1.1.0","name":"k","type":"ambient-cni","agent_socket":"/nonexistent/x.sock"}"#;
    let out = run(&[("CNI_COMMAND", "STATUS")], absent.as_bytes());
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let strict = absent.replace('}', r#","status_requires_agent":true}"#);
    run(&[("CNI_COMMAND", "STATUS")], strict.as_bytes()).assert_error(50);
    let out = run(
        &[("CNI_COMMAND", "STATUS")],
        v11(r#","status_requires_agent":true"#).as_bytes(),
    );
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    // An unusable conf still fails STATUS.
    let bad = absent.replace('}', r#","timeout_ms":0}"#);
    run(&[("CNI_COMMAND", "STATUS")], bad.as_bytes()).assert_error(7);
}

#[test]
fn status_does_not_dial_the_agent_by_default() {
    let dir = TempDir::new("acni-status");
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let conf = |extra: &str| {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"k","type":"ambient-cni","agent_socket":"{}","timeout_ms":300{extra}}}"#,
            path.display()
        )
    };
    // Every few seconds from containerd: no connection at all.
    let out = run(&[("CNI_COMMAND", "STATUS")], conf("").as_bytes());
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert!(
        listener.accept().is_err(),
        "default STATUS connected to the agent"
    );
    // Opted in: it asks (and this listener never answers, so 50).
    run(
        &[("CNI_COMMAND", "STATUS")],
        conf(r#","status_requires_agent":true"#).as_bytes(),
    )
    .assert_error(50);
    assert!(listener.accept().is_ok(), "opted-in STATUS asked the agent");
}

/// The plugin with `CNI_ARGS` set to raw bytes (not UTF-8), as a runtime could pass them.
fn run_with_raw_args(cmd: &str, args: &[u8], stdin: &[u8]) -> (i32, String) {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let mut child = std::process::Command::new(plugin_bin())
        .env_clear()
        .envs(
            add_env(NS, MESH_POD)
                .into_iter()
                .filter(|(k, _)| *k != "CNI_ARGS"),
        )
        .env("CNI_COMMAND", cmd)
        .env("CNI_ARGS", std::ffi::OsStr::from_bytes(args))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn plugin");
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn cni_args_that_are_not_utf8_are_code_4_but_del_succeeds() {
    let stdin = conf(&format!(
        r#","agent_socket":"/nonexistent/acni.sock","timeout_ms":300{PREV}"#
    ));
    let raw = b"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-\xff0";
    for cmd in ["ADD", "CHECK"] {
        let (code, stdout) = run_with_raw_args(cmd, raw, stdin.as_bytes());
        assert_eq!(code, 1, "{cmd}: {stdout}");
        let v: Value = serde_json::from_str(&stdout).expect("error JSON");
        assert_eq!(v["code"], 4, "{cmd}: {v}");
        assert!(
            v["msg"].as_str().unwrap_or_default().contains("CNI_ARGS"),
            "{v}"
        );
    }
    let (code, stdout) = run_with_raw_args("DEL", raw, stdin.as_bytes());
    assert_eq!((code, stdout.as_str()), (0, ""), "DEL never fails");
    // Malformed (but UTF-8) CNI_ARGS: DEL succeeds too.
    let (code, stdout) = run_with_raw_args("DEL", b"K8S_POD_NAME", stdin.as_bytes());
    assert_eq!((code, stdout.as_str()), (0, ""), "DEL never fails");
}

#[test]
fn non_root_peer_is_refused_by_the_agent() {
    use std::os::unix::process::CommandExt;
    if !require_root("non_root_peer_is_refused_by_the_agent") {
        return;
    }
    let dir = TempDir::new("acni-peer");
    let agent = AgentProcess::start(&dir.0, &[]);
    let sock = agent.socket.clone();
    let mode = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&sock).ok(), Some(0o600), "socket must be 0600");
    // Open the file modes so only the SO_PEERCRED check stands between nobody and the agent.
    for p in [&dir.0, &sock] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let stdin = conf(&format!(
        r#","agent_socket":"{}","timeout_ms":1000{PREV}"#,
        sock.display()
    ));
    let mut child = std::process::Command::new(plugin_bin())
        .uid(65534)
        .gid(65534)
        .env_clear()
        .envs(add_env(NS, MESH_POD))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn as nobody");
    {
        use std::io::Write;
        let mut i = child.stdin.take().expect("stdin");
        let _ = i.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "nobody must not be served");
    let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert!(v["code"] == 11 || v["code"] == 101, "{v}");
    assert!(
        wait_for(Duration::from_secs(2), || agent
            .log_text()
            .contains("foreign uid")),
        "agent log: {}",
        agent.log_text()
    );
}

// ---- the agent down: its decisions file lets known non-mesh pods start ----

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One metric sample from the agent's `/metrics` on `port` (a plain-text search).
fn sample(port: u16, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn agent_down_passes_known_plain_pods_on_its_decisions_file() {
    if !require_root("agent_down_passes_known_plain_pods_on_its_decisions_file") {
        return;
    }
    let dir = TempDir::new("acni-fallback");
    let pods = dir.join("pods");
    write_namespace(
        &pods,
        "mesh",
        serde_json::json!({"istio.io/dataplane-mode": "ambient"}),
    );
    write_namespace(&pods, "plain", serde_json::json!({}));
    write_pod(
        &pods,
        "plain",
        "web",
        "uid-web",
        None,
        serde_json::json!({}),
    );
    write_pod(
        &pods,
        "plain",
        "labelled",
        "uid-labelled",
        None,
        serde_json::json!({"istio.io/dataplane-mode": "ambient"}),
    );
    write_pod(&pods, "mesh", "app", "uid-app", None, serde_json::json!({}));
    let mut agent = AgentProcess::start(&dir.0, &["--decisions-refresh-seconds", "1"]);
    let file = dir.join("decisions.json");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&file)
            .is_ok_and(|t| t.contains("uid-web"))),
        "no decisions file; agent log:\n{}",
        agent.log_text()
    );
    let good = std::fs::read(&file).expect("decisions file");
    let listed: Value = serde_json::from_slice(&good).expect("JSON");
    assert_eq!(listed["version"], 1);
    assert_eq!(
        listed["pods"],
        serde_json::json!([{"namespace": "plain", "name": "web", "uid": "uid-web"}]),
        "only the seen plain pod: {listed}"
    );
    // The agent is killed (crash, upgrade gap): its socket file stays, nobody answers.
    agent.kill();
    let netns = NamedNetns::new();
    let stdin = |extra: &str| {
        conf(&format!(
            r#","agent_socket":"{}","timeout_ms":500{extra}{PREV}"#,
            agent.socket.display()
        ))
    };
    let add = |ns: &str, name: &str, uid: Option<&str>, extra: &str| {
        let args = match uid {
            Some(u) => format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={u}"),
            None => format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
        };
        let path = netns.path();
        run(&add_env(&path, &args), stdin(extra).as_bytes())
    };
    let passes = |out: &Exec| {
        assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
        assert_eq!(
            out.json(),
            serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}]}),
            "prevResult passed through"
        );
        assert!(out.stderr.contains("passed through"), "{}", out.stderr);
    };
    passes(&add("plain", "web", Some("uid-web"), ""));
    for (what, ns, name, uid) in [
        ("mesh pod", "mesh", "app", Some("uid-app")),
        (
            "pod labelled ambient",
            "plain",
            "labelled",
            Some("uid-labelled"),
        ),
        ("unknown pod", "plain", "new", Some("uid-new")),
        ("namesake of a plain pod", "plain", "web", Some("uid-other")),
        ("no uid", "plain", "web", None),
    ] {
        let out = add(ns, name, uid, "");
        let v = out.assert_error(11);
        assert!(
            v["details"]
                .as_str()
                .unwrap_or_default()
                .contains("failed closed"),
            "{what}: {v}"
        );
    }
    // The fallback can be turned off.
    add(
        "plain",
        "web",
        Some("uid-web"),
        r#","decisions_max_age_s":0"#,
    )
    .assert_error(11);
    // Corrupt, truncated, stale or missing: fail closed.
    let stale = String::from_utf8(good.clone()).expect("utf8").replace(
        &format!("\"written_at\":{}", listed["written_at"]),
        &format!("\"written_at\":{}", now_s() - 3600),
    );
    for (what, bytes) in [
        ("corrupt", b"\x00garbage".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("stale", stale.into_bytes()),
    ] {
        std::fs::write(&file, &bytes).expect("write");
        let v = add("plain", "web", Some("uid-web"), "").assert_error(11);
        eprintln!("{what}: {v}");
    }
    std::fs::remove_file(&file).expect("rm");
    add("plain", "web", Some("uid-web"), "").assert_error(11);
    // A fresh file again (as written by the agent): passes.
    std::fs::write(&file, &good).expect("write");
    passes(&add("plain", "web", Some("uid-web"), ""));

    // The plugin counted 2 pass-throughs and 10 fail-closed; the restarted agent exports them.
    let counted = std::fs::read(dir.join("plugin-fallbacks")).expect("counter file");
    assert_eq!(
        String::from_utf8_lossy(&counted),
        format!("p{}p", "f".repeat(10))
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let _agent = AgentProcess::start(&dir.0, &["--metrics-addr", &addr]);
    assert_eq!(
        sample(
            port,
            r#"ambient_cni_plugin_fallback_total{outcome="pass_through"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            port,
            r#"ambient_cni_plugin_fallback_total{outcome="fail_closed"}"#
        ),
        Some(10.0)
    );
}
