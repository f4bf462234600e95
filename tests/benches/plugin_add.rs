//! Plugin ADD latency and footprint: 500 sequential ADDs of a pass-through pod
//! and of a pod the agent is asked about, beside `/bin/true` exec'd the same way
//! in the same run (these machines are noisy: compare within a run).
//!
//! `cargo bench -p ambient-cni-tests --bench plugin_add` (uses the static musl
//! plugin when built, else `target/release/ambient-cni`; `AMBIENT_CNI_PLUGIN` overrides).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambient_cni_tests::{plugin_entry, target_dir, AgentProcess, TempDir};

const N: usize = 500;

/// One exec: wall time and the child's peak RSS (KiB), via wait4.
fn exec_once(bin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> (Duration, i64, i32) {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter for wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child pid; std never waits for it (we drop the handle).
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    assert!(pid > 0, "wait4 failed");
    std::mem::forget(child);
    (elapsed, usage.ru_maxrss, libc::WEXITSTATUS(status))
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max_rss_kib: i64,
}

fn measure(bin: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Stats {
    // Warm the page cache and the agent's connection path first.
    for _ in 0..20 {
        exec_once(bin, env, stdin);
    }
    let mut times = Vec::with_capacity(N);
    let mut rss = 0;
    for _ in 0..N {
        let (t, r, code) = exec_once(bin, env, stdin);
        assert_eq!(code, 0, "{} exited {code}", bin.display());
        times.push(t);
        rss = rss.max(r);
    }
    times.sort();
    Stats {
        p50: times[N / 2],
        p99: times[N * 99 / 100],
        max_rss_kib: rss,
    }
}

fn plugin() -> PathBuf {
    if let Some(p) = std::env::var_os("AMBIENT_CNI_PLUGIN") {
        return p.into();
    }
    let root = target_dir();
    let musl = root
        .parent()
        .map(|t| t.join("x86_64-unknown-linux-musl/release/ambient-cni"))
        .filter(|p| p.exists());
    musl.unwrap_or_else(|| root.join("ambient-cni"))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: nothing else to parse.
    let bin = plugin();
    let dir = TempDir::new("acni-bench");
    // The asked pod exists outside the mesh: one agent round trip, "not in mesh".
    ambient_cni_tests::write_pod(
        &dir.join("pods"),
        "shop",
        "web-0",
        "u1",
        None,
        serde_json::json!({}),
    );
    let agent = AgentProcess::start(&dir.0, &[]);
    let sock = agent.socket.clone();
    let mut entry = plugin_entry(&sock, 5000);
    entry["log_level"] = "error".into();
    entry["cniVersion"] = "1.0.0".into();
    entry["prevResult"] = serde_json::json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
        "ips": [{"address": "10.99.0.5/24", "gateway": "10.99.0.1", "interface": 0}],
    });
    let conf = entry.to_string();
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "bench"),
        ("CNI_NETNS", "/proc/self/ns/net"),
        ("CNI_IFNAME", "eth0"),
    ];
    let pass = [&base[..], &[("CNI_ARGS", "IgnoreUnknown=1")]].concat();
    let asked = [
        &base[..],
        &[(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1",
        )],
    ]
    .concat();

    let truth = measure(Path::new("/bin/true"), &[], b"");
    let p = measure(&bin, &pass, conf.as_bytes());
    let a = measure(&bin, &asked, conf.as_bytes());
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);

    println!(
        "plugin: {} ({:.2} MiB)",
        ambient_cni_tests::bench::shown(&bin),
        size as f64 / (1 << 20) as f64
    );
    println!("{N} sequential ADDs each; baseline /bin/true exec'd the same way in the same run\n");
    println!("| case | p50 ms | p99 ms | p50 over /bin/true | target | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let over = |s: &Stats| s.p50.saturating_sub(truth.p50);
    let rss = |s: &Stats| format!("{:.1}", s.max_rss_kib as f64 / 1024.0);
    println!(
        "| /bin/true (baseline) | {} | {} | - | - | {} |",
        ms(truth.p50),
        ms(truth.p99),
        rss(&truth)
    );
    println!(
        "| ADD pass-through | {} | {} | +{} ms ({:.2}x) | +1 ms | {} |",
        ms(p.p50),
        ms(p.p99),
        ms(over(&p)),
        p.p50.as_secs_f64() / truth.p50.as_secs_f64(),
        rss(&p)
    );
    println!(
        "| ADD asked (agent answers) | {} | {} | +{} ms ({:.2}x) | +2 ms | {} |",
        ms(a.p50),
        ms(a.p99),
        ms(over(&a)),
        a.p50.as_secs_f64() / truth.p50.as_secs_f64(),
        rss(&a)
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!(
        "targets: pass-through p50 within 1 ms of /bin/true: {}",
        verdict(over(&p) <= Duration::from_millis(1))
    );
    println!(
        "         asked p50 within 2 ms of /bin/true: {}",
        verdict(over(&a) <= Duration::from_millis(2))
    );
    println!(
        "         binary < 5 MiB: {} ({} bytes)",
        verdict(size < 5 << 20),
        size
    );
    println!(
        "         peak RSS < 8 MiB: {}",
        verdict(p.max_rss_kib.max(a.max_rss_kib) < 8 * 1024)
    );
}
