//! Bench: one drift-verification pass over N held pods (issue 19), nftables backend.
//!
//! N pod netns each get the default in-pod rules and policy route; a throw-away "host" netns
//! gets the probe set with every pod's IP. A pass is what the agent's verifier does per pod:
//! `stat` its netns path, read back its rules and route (`Redirector::verify`, nothing
//! written) and read the probe set. Measured: wall time and CPU time (user + system of the
//! whole process, every thread) per pass, beside the baseline of re-applying every pod (what a
//! verifier without readback would have to do). Needs root. `VERIFY_BENCH_PODS` sets N
//! (default 250), `VERIFY_BENCH_PASSES` the passes (default 5).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use iptables_rules::backend::nftables::NftablesBackend;
use iptables_rules::backend::{make, BackendKind, RulesBackend};
use iptables_rules::drift::compare_probe;
use iptables_rules::netns::Netns;
use iptables_rules::nft::host::NftHostProbe;
use iptables_rules::route;
use iptables_rules::{HostProbeConfig, InpodConfig, Redirector};

fn env_n(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of the whole process so far, every thread included.
fn cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass; all-zero is a valid rusage.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut ru), 0, "getrusage");
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Pod {
    _fd: OwnedFd,
    ns: Netns,
    path: String,
    ip: IpAddr,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: needs root");
        return;
    }
    let n = env_n("VERIFY_BENCH_PODS", 250);
    let passes = env_n("VERIFY_BENCH_PASSES", 5).max(1);
    // The whole bench runs on a thread in its own "host" netns (the probe set lives there).
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        run(n, passes);
    })
    .join()
    .expect("bench thread");
}

fn run(n: usize, passes: usize) {
    let r = Redirector::new(make(BackendKind::Nftables).expect("nftables backend"));
    let cfg = InpodConfig::default();
    let pods: Vec<Pod> = (0..n)
        .map(|i| {
            let fd: OwnedFd = std::thread::spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                let lo = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .expect("ip");
                assert!(lo.success());
                std::fs::File::open("/proc/thread-self/ns/net")
                    .expect("ns")
                    .into()
            })
            .join()
            .expect("netns thread");
            let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
            let ns = Netns::open(Path::new(&path), None).expect("open netns");
            r.apply(&ns, &cfg).expect("apply");
            let ip = IpAddr::V4(Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1));
            Pod {
                _fd: fd,
                ns,
                path,
                ip,
            }
        })
        .collect();
    let probe = NftHostProbe;
    probe
        .apply(&HostProbeConfig {
            kubelet_uid: Some(1000),
            ..HostProbeConfig::default()
        })
        .expect("probe set");
    for (i, p) in pods.iter().enumerate() {
        probe.upsert(&format!("uid-{i}"), &[p.ip]).expect("upsert");
    }

    let mut wall = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..passes {
        let (t0, c0) = (Instant::now(), cpu());
        for (i, p) in pods.iter().enumerate() {
            let id = p.ns.id();
            let md = std::fs::metadata(&p.path).expect("stat");
            assert!(md.dev() == id.dev && md.ino() == id.ino);
            let drift = r.verify(&p.ns, &cfg).expect("verify");
            assert!(drift.is_empty(), "{drift:?}");
            let entries = probe.lookup(&[p.ip]).expect("lookup");
            assert!(compare_probe(&entries, &format!("uid-{i}"), &[p.ip]).is_empty());
        }
        wall.push(t0.elapsed());
        cpus.push(cpu() - c0);
    }
    // Where the CPU goes: each part alone over all pods.
    let part = |f: &dyn Fn(usize, &Pod)| {
        let c0 = cpu();
        for (i, p) in pods.iter().enumerate() {
            f(i, p);
        }
        cpu() - c0
    };
    // Parts "in the pod netns" include entering it (the first row).
    let parts = [
        (
            "entering the netns (thread + setns)",
            part(&|_, p| p.ns.run(|| ()).expect("run")),
        ),
        (
            "rules readback, in the pod netns (two nf_tables dumps)",
            part(&|_, p| {
                p.ns.run(|| NftablesBackend.drift(&cfg).expect("rules"))
                    .expect("run");
            }),
        ),
        (
            "route + fwmark rule readback, in the pod netns",
            part(&|_, p| {
                p.ns.run(|| route::state().expect("route")).expect("run");
            }),
        ),
        (
            "probe set lookup of the pod's IPs (host netns)",
            part(&|i, p| {
                let entries = probe.lookup(&[p.ip]).expect("lookup");
                assert!(compare_probe(&entries, &format!("uid-{i}"), &[p.ip]).is_empty());
            }),
        ),
    ];
    let mut base_wall = Vec::new();
    let mut base_cpu = Vec::new();
    for _ in 0..passes.min(3) {
        let (t0, c0) = (Instant::now(), cpu());
        for p in &pods {
            r.apply(&p.ns, &cfg).expect("apply");
        }
        base_wall.push(t0.elapsed());
        base_cpu.push(cpu() - c0);
    }
    let (w, c) = (median(wall), median(cpus));
    let (bw, bc) = (median(base_wall), median(base_cpu));
    println!("One verification pass over {n} held pods (nftables backend), median of {passes} passes; baseline: re-applying every pod.\n");
    println!("| pass over {n} pods | wall ms | CPU ms | CPU per pod µs | vs baseline (CPU) |");
    println!("|---|---|---|---|---|");
    println!(
        "| verify (readback only: netns stat, rules + route, probe set) | {:.1} | {:.1} | {:.0} | {:.2}x |",
        ms(w),
        ms(c),
        c.as_secs_f64() * 1e6 / n as f64,
        c.as_secs_f64() / bc.as_secs_f64().max(1e-9)
    );
    println!(
        "| baseline: re-apply every pod | {:.1} | {:.1} | {:.0} | 1.00x |",
        ms(bw),
        ms(bc),
        bc.as_secs_f64() * 1e6 / n as f64
    );
    for (what, c) in parts {
        println!(
            "| part, alone: {what} | | {:.1} | {:.0} | |",
            ms(c),
            c.as_secs_f64() * 1e6 / n as f64
        );
    }
    println!(
        "\nGoal: under 50 ms CPU per pass of 250 pods (the agent spreads a pass over VERIFY_INTERVAL, 30 s by default)."
    );
}
