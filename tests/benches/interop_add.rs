//! Captured-pod ADD latency with STOCK ztunnel acking (`ZTUNNEL_BIN`, ../shared/peers/README.md),
//! per rules backend, beside the same measure with the ztunnel stand-in in the same run.
//! Each ADD is a plugin exec for a fresh netns: plugin → agent → in-pod rules → ZDS
//! AddWorkload → ack (for stock ztunnel: after it has opened the pod's four listeners).
//!
//! `cargo bench -p ambient-cni-tests --bench interop_add` (`INTEROP_BENCH_PODS`, default 100).

use std::path::Path;
use std::time::Duration;

use ambient_cni_tests::peers::{xds_yaml, XdsWorkload, Ztunnel};
use ambient_cni_tests::*;
use serde_json::json;

use ambient_cni_tests::bench::{add, pct, plugin_conf, pods_from_env};

/// The ZDS peer acking the adds (held until the measure ends).
enum Peer {
    Standin(#[allow(dead_code)] Standin),
    Ztunnel(Ztunnel),
}

/// Runs `n` captured ADDs (sequential) with `backend` against `peer`; returns the exec times.
fn measure(backend: &str, ztunnel: Option<&Path>, n: usize) -> Vec<Duration> {
    let dir = TempDir::new("acni-ibench");
    write_namespace(
        &dir.join("pods"),
        "mesh",
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let mut pods = Vec::new();
    let mut xds = Vec::new();
    for i in 0..n {
        let ns = NamedNetns::new();
        let name = format!("b{i}");
        let uid = format!("{}-{name}", ns.name());
        // write_pod gives pod NAME the service account sa-NAME.
        write_pod(&dir.join("pods"), "mesh", &name, &uid, None, json!({}));
        xds.push(XdsWorkload::new("mesh", &name, &format!("sa-{name}")));
        pods.push((ns, name, uid));
    }
    std::fs::write(dir.join("xds.yaml"), xds_yaml(&xds)).expect("xds file");
    let agent = AgentProcess::start(
        &dir.0,
        &[
            "--rules-backend",
            backend,
            "--log-level",
            "warn,ambient_cni_agent::mesh::controller=info",
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let sock = dir.join("ztunnel.sock");
    let peer = match ztunnel {
        Some(bin) => {
            let z = Ztunnel::start(bin, &sock, &dir.join("xds.yaml"), &dir.join("zt.log"));
            assert!(
                z.wait_ready(Duration::from_secs(20)),
                "ztunnel not ready:\n{}",
                z.log_text()
            );
            Peer::Ztunnel(z)
        }
        None => {
            let s = Standin::start(&sock, &dir.join("standin.jsonl"), &[]);
            assert!(s.wait_count("snapshot_sent", 1, Duration::from_secs(10)));
            Peer::Standin(s)
        }
    };
    let conf = plugin_conf(&agent.socket);
    let mut times = Vec::with_capacity(n);
    for (ns, name, uid) in &pods {
        let out = add(&conf, ns, name, uid);
        assert_eq!(out.code, 0, "{} {}", out.stdout, agent.log_text());
        times.push(out.elapsed);
    }
    if let Peer::Ztunnel(z) = &peer {
        let log = z.log_text();
        let started = log.matches("pod received, starting proxy").count();
        assert_eq!(started, n, "ztunnel started a proxy per ADD");
        assert!(!log.contains("protocol mismatch"));
    }
    drop(peer);
    drop(agent);
    times
}

fn main() {
    if !require_root("interop_add bench") {
        return;
    }
    let n = pods_from_env("INTEROP_BENCH_PODS", 100);
    let zt = std::env::var_os("ZTUNNEL_BIN")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from);
    if zt.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "ZTUNNEL_BIN is unset and CI is set (see ../shared/peers/README.md)"
        );
        eprintln!(
            "ZTUNNEL_BIN is unset: stock ztunnel rows skipped (see ../shared/peers/README.md)"
        );
    }
    println!("captured-pod ADD, {n} pods sequential, plugin exec → agent → rules → ZDS ack\n");
    println!("| backend | ZDS peer | p50 | p99 | p50 vs stand-in |");
    println!("|---|---|---|---|---|");
    for backend in ["nftables", "iptables"] {
        let base = measure(backend, None, n);
        let (b50, b99) = (pct(&base, 50), pct(&base, 99));
        println!("| {backend} | stand-in | {b50:.2} ms | {b99:.2} ms | 1.00× |");
        if let Some(bin) = &zt {
            let t = measure(backend, Some(bin), n);
            let (p50, p99) = (pct(&t, 50), pct(&t, 99));
            println!(
                "| {backend} | stock ztunnel | {p50:.2} ms | {p99:.2} ms | {:.2}× |",
                p50 / b50
            );
        }
    }
}
