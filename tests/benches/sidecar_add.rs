//! Sidecar mode (issue 20), root: the ADD of a sidecar-injected pod (Istio's sidecar
//! redirection installed inside the ADD), per rules backend, beside an ambient captured
//! ADD and `/bin/true` timed by the same exec harness in the same run.
//!
//! `cargo bench -p ambient-cni-tests --bench sidecar_add` (`SIDECAR_BENCH_PODS` to scale).

use std::time::Duration;

use ambient_cni_tests::bench::{add_in, harness_rows, pct, plugin_conf, pods_from_env};
use ambient_cni_tests::*;
use serde_json::{json, Value};

/// An injected pod of namespace `shop` with its UID.
fn injected(name: &str, uid: &str) -> Value {
    let mut p = injected_pod("shop", name);
    p["metadata"]["uid"] = uid.into();
    p
}

/// `n` ADDs of sidecar pods and `n` of ambient pods (interleaved, so load hits both alike)
/// against one agent on `backend`; each ADD's wall time as the runtime sees it.
fn run(backend: &str, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let dir = TempDir::new("acni-sbench");
    let pods = dir.join("pods");
    write_namespace(&pods, "mesh", json!({"istio.io/dataplane-mode": "ambient"}));
    write_namespace(&pods, "shop", json!({}));
    let mut netns = Vec::with_capacity(2 * n);
    for i in 0..n {
        let s = NamedNetns::new();
        let a = NamedNetns::new();
        let (su, au) = (format!("{}-s{i}", s.name()), format!("{}-a{i}", a.name()));
        write_pod_object(&pods, &injected(&format!("s{i}"), &su));
        write_pod(&pods, "mesh", &format!("a{i}"), &au, None, json!({}));
        netns.push((s, su, a, au, i));
    }
    let agent = AgentProcess::start(
        &dir.0,
        &[
            "--rules-backend",
            backend,
            "--verify-interval",
            "0",
            "--log-level",
            "warn,ambient_cni_agent::mesh::controller=info",
        ],
    );
    let standin = Standin::start(
        &dir.join("ztunnel.sock"),
        &dir.join("standin.jsonl"),
        &["--no-dns"],
    );
    assert!(standin.wait_count("snapshot_sent", 1, Duration::from_secs(10)));
    let conf = plugin_conf(&agent.socket);
    let (mut side, mut amb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (s, su, a, au, i) in &netns {
        let e = add_in(&conf, "shop", s, &format!("s{i}"), su);
        assert_eq!(e.code, 0, "sidecar ADD {i}: {}", e.stderr);
        side.push(e.elapsed);
        let e = add_in(&conf, "mesh", a, &format!("a{i}"), au);
        assert_eq!(e.code, 0, "ambient ADD {i}: {}", e.stderr);
        amb.push(e.elapsed);
    }
    (side, amb)
}

fn main() {
    if !require_root("sidecar_add bench") {
        return;
    }
    let n = pods_from_env("SIDECAR_BENCH_PODS", 200);
    let floor = harness_rows()
        .into_iter()
        .next()
        .expect("the /bin/true row");
    println!("ADD of a sidecar-injected pod (Istio's redirection installed inside the ADD), {n} pods sequential, ");
    println!("interleaved with {n} ambient captured ADDs on the same agent; local pod source, ztunnel stand-in\n");
    println!("| path | backend | p50 ms | p99 ms | p50 over /bin/true | p99 over /bin/true |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| /bin/true, same harness (floor) | - | {:.2} | {:.2} | - | - |",
        floor.1, floor.2
    );
    for backend in ["nftables", "iptables"] {
        let (side, amb) = run(backend, n);
        for (what, v) in [("sidecar pod ADD", &side), ("ambient pod ADD", &amb)] {
            let (p50, p99) = (pct(v, 50), pct(v, 99));
            println!(
                "| {what} | {backend} | {p50:.2} | {p99:.2} | {:+.2} ms | {:+.2} ms |",
                p50 - floor.1,
                p99 - floor.2
            );
        }
    }
}
