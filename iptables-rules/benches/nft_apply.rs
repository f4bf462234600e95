//! Bench: installing the default in-pod ruleset into fresh network namespaces.
//!
//! Rows, all measured in this run, interleaved per iteration (each in its own new netns):
//! our native nf_tables apply (socket closed by the background reaper, i.e. what a pod waits
//! for), the same with the socket closed inline, `nft -f -` exec of the same ruleset text, and
//! Istio's mechanism `iptables-nft-restore --noflush` exec (plus its full per-pod sequence:
//! `iptables-save`, `ip6tables-save`, restore). Also the native apply's phases.
//! Needs root. `NFT_BENCH_N` sets the iteration count (default 200).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iptables_rules::backend::nftables::NftablesBackend;
use iptables_rules::model::Family;
use iptables_rules::nft::NftSocket;
use iptables_rules::{inpod_ruleset, render, InpodConfig, RulesBackend};

fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .expect("bench thread panicked")
}

fn exec_with_stdin(prog: &str, args: &[&str], stdin: &str) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn exec(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn timed(f: impl FnOnce() + Send + 'static) -> Duration {
    in_fresh_netns(move || {
        let t = Instant::now();
        f();
        t.elapsed()
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

struct Row {
    name: &'static str,
    samples: Vec<Duration>,
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("nft_apply bench needs root; skipping");
        return;
    }
    let n: usize = std::env::var("NFT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cfg = InpodConfig::default();
    let rs = inpod_ruleset(&cfg);
    let nft_text = render::nft_text(&rs);
    let ipt_text = render::iptables_restore(&rs, Family::V4);
    let have_ipt = Command::new("iptables-nft-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());

    let mut rows = vec![
        Row {
            name: "native apply (reaper close)",
            samples: vec![],
        },
        Row {
            name: "native apply (inline close)",
            samples: vec![],
        },
        Row {
            name: "native re-apply (reaper close)",
            samples: vec![],
        },
        Row {
            name: "native re-apply (inline close)",
            samples: vec![],
        },
        Row {
            name: "nft -f - (exec)",
            samples: vec![],
        },
    ];
    if have_ipt {
        rows.push(Row {
            name: "iptables-nft-restore (exec)",
            samples: vec![],
        });
        rows.push(Row {
            name: "istio seq: 2x save + restore",
            samples: vec![],
        });
    }
    let mut phases: [Vec<Duration>; 4] = Default::default();
    // Re-apply into a netns that already has the rules (flush + rebuild): commit and close times.
    let reapply: std::rc::Rc<std::cell::RefCell<[Vec<Duration>; 2]>> = Default::default();

    // Warm-up: module loading, page cache for the binaries.
    for _ in 0..5 {
        let c = cfg.clone();
        timed(move || NftablesBackend.apply(&c).expect("native apply"));
        let t = nft_text.clone();
        timed(move || exec_with_stdin("nft", &["-f", "-"], &t));
    }

    // One closure per row; each iteration runs them in a rotated order so no row always
    // follows the heavy exec rows (whose netns teardown runs in the background).
    type Case = Box<dyn Fn(&mut [Vec<Duration>; 4]) -> Duration>;
    let mut cases: Vec<Case> = Vec::new();
    {
        let c = cfg.clone();
        cases.push(Box::new(move |_| {
            let c = c.clone();
            timed(move || NftablesBackend.apply(&c).expect("native apply"))
        }));
        let c = cfg.clone();
        cases.push(Box::new(move |phases| {
            let c = c.clone();
            let ph = in_fresh_netns(move || {
                let t0 = Instant::now();
                let mut sock = NftSocket::open().expect("open");
                let t1 = Instant::now();
                let batch = NftablesBackend::batch_for(&inpod_ruleset(&c)).expect("batch");
                let t2 = Instant::now();
                sock.commit(batch).expect("commit");
                let t3 = Instant::now();
                sock.close_now();
                let t4 = Instant::now();
                [t1 - t0, t2 - t1, t3 - t2, t4 - t3]
            });
            for (acc, d) in phases.iter_mut().zip(ph) {
                acc.push(d);
            }
            ph.iter().sum()
        }));
        let c = cfg.clone();
        cases.push(Box::new(move |_| {
            let c = c.clone();
            in_fresh_netns(move || {
                NftablesBackend.apply(&c).expect("first apply");
                let t = Instant::now();
                NftablesBackend.apply(&c).expect("re-apply");
                t.elapsed()
            })
        }));
        let c = cfg.clone();
        let re = reapply.clone();
        cases.push(Box::new(move |_| {
            let c = c.clone();
            let ph = in_fresh_netns(move || {
                NftablesBackend.apply(&c).expect("first apply");
                let mut sock = NftSocket::open().expect("open");
                let batch = NftablesBackend::batch_for(&inpod_ruleset(&c)).expect("batch");
                let t0 = Instant::now();
                sock.commit(batch).expect("commit");
                let t1 = Instant::now();
                sock.close_now();
                [t1 - t0, t1.elapsed()]
            });
            let mut re = re.borrow_mut();
            re[0].push(ph[0]);
            re[1].push(ph[1]);
            ph[0] + ph[1]
        }));
        let t = nft_text.clone();
        cases.push(Box::new(move |_| {
            let t = t.clone();
            timed(move || exec_with_stdin("nft", &["-f", "-"], &t))
        }));
        if have_ipt {
            let t = ipt_text.clone();
            cases.push(Box::new(move |_| {
                let t = t.clone();
                timed(move || exec_with_stdin("iptables-nft-restore", &["--noflush"], &t))
            }));
            let t = ipt_text.clone();
            cases.push(Box::new(move |_| {
                let t = t.clone();
                timed(move || {
                    exec("iptables-nft-save", &[]);
                    exec("ip6tables-nft-save", &[]);
                    exec_with_stdin("iptables-nft-restore", &["--noflush"], &t);
                })
            }));
        }
    }
    for i in 0..n {
        for k in 0..cases.len() {
            let j = (i + k) % cases.len();
            let d = cases[j](&mut phases);
            rows[j].samples.push(d);
        }
    }

    let base = {
        let mut s = rows[0].samples.clone();
        s.sort();
        pct(&s, 0.5)
    };
    println!("default in-pod ruleset (v4, DNS on: 3 tables, 12 chains, 18 rules), {n} applies, each into a fresh netns");
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>12}",
        "mechanism", "p50 ms", "p99 ms", "mean ms", "p50 / native"
    );
    for r in &mut rows {
        r.samples.sort();
        let mean = r.samples.iter().sum::<Duration>() / r.samples.len() as u32;
        println!(
            "{:<32} {:>10} {:>10} {:>10} {:>11.1}x",
            r.name,
            ms(pct(&r.samples, 0.5)),
            ms(pct(&r.samples, 0.99)),
            ms(mean),
            pct(&r.samples, 0.5).as_secs_f64() / base.as_secs_f64()
        );
    }
    println!();
    println!(
        "native phases (inline-close run)  {:>10} {:>10}",
        "p50 ms", "p99 ms"
    );
    for (name, s) in [
        "socket open",
        "generate + lower + encode",
        "commit (send + ACKs)",
        "socket close",
    ]
    .iter()
    .zip(phases.iter_mut())
    {
        s.sort();
        println!(
            "  {:<31} {:>10} {:>10}",
            name,
            ms(pct(s, 0.5)),
            ms(pct(s, 0.99))
        );
    }
    let mut re = reapply.borrow_mut();
    for (name, s) in ["re-apply commit", "socket close after re-apply"]
        .iter()
        .zip(re.iter_mut())
    {
        s.sort();
        println!(
            "  {:<31} {:>10} {:>10}",
            name,
            ms(pct(s, 0.5)),
            ms(pct(s, 0.99))
        );
    }
}
