//! Apply latency into fresh netns: our backends vs Istio's mechanism (exec `iptables-save`
//! + `ip6tables-save`, then `iptables-restore --noflush` of the same text, in the netns).
//!
//! Run as root: `cargo bench -p iptables-rules --bench apply` (N via `BENCH_N`, default 200).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iptables_rules::backend::iptables::{Flavor, Iptables};
use iptables_rules::backend::{self, BackendKind, RulesBackend};
use iptables_rules::model::Family;
use iptables_rules::netns::Netns;
use iptables_rules::{exec, inpod_ruleset, render, InpodConfig, Redirector};

/// A named netns with lo up, deleted on drop (creation is outside the timed region).
struct Ns {
    name: String,
    ns: Netns,
}

impl Ns {
    fn new(i: usize) -> Self {
        let name = format!("rcb-{}-{i}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let ns = Netns::open(&Path::new("/run/netns").join(&name), None).expect("open netns");
        Self { name, ns }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?}");
}

/// One measured variant: `f` is timed once per fresh netns.
fn measure(n: usize, mut f: impl FnMut(&Netns)) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ns = Ns::new(i);
        let t = Instant::now();
        f(&ns.ns);
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Istio's per-pod work for the rules (§4.4): both saves (verify), then one restore.
fn istio_mechanism<'a>(flavor: &'a str, text: &'a str) -> impl FnMut(&Netns) + 'a {
    let save4 = format!("{flavor}-save");
    let save6 = format!("{}-save", flavor.replacen("iptables", "ip6tables", 1));
    let restore = format!("{flavor}-restore");
    move |ns: &Netns| {
        ns.run(|| {
            exec::run(flavor, &save4, &[], None).expect("save");
            exec::run(flavor, &save6, &[], None).expect("save6");
            exec::run(flavor, &restore, &["--noflush"], Some(text.as_bytes())).expect("restore");
        })
        .expect("netns");
    }
}

fn rules_only<'a>(b: &'a dyn RulesBackend, cfg: &'a InpodConfig) -> impl FnMut(&Netns) + 'a {
    move |ns: &Netns| ns.run(|| b.apply(cfg).expect("apply")).expect("netns")
}

fn with_route<'a>(r: &'a Redirector, cfg: &'a InpodConfig) -> impl FnMut(&Netns) + 'a {
    move |ns: &Netns| r.apply(ns, cfg).expect("apply")
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("apply bench skipped: needs root");
        return;
    }
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let cfg = InpodConfig::default();
    let text = render::iptables_restore(&inpod_ruleset(&cfg), Family::V4);
    let mut rows: Vec<(String, Vec<Duration>, Option<usize>)> = Vec::new();

    // iptables flavours: Istio's mechanism is the baseline for each.
    for (flavor, fl) in [
        ("iptables-nft", Flavor::Nft),
        ("iptables-legacy", Flavor::Legacy),
    ] {
        let base = rows.len();
        rows.push((
            format!("istio mechanism ({flavor}: 2 save + restore)"),
            measure(n, istio_mechanism(flavor, &text)),
            None,
        ));
        let b = Iptables::with_binary(fl, flavor);
        rows.push((
            format!("ours {flavor}, rules only"),
            measure(n, rules_only(&b, &cfg)),
            Some(base),
        ));
        let r = Redirector::new(Box::new(b.clone()));
        rows.push((
            format!("ours {flavor}, rules + policy route"),
            measure(n, with_route(&r, &cfg)),
            Some(base),
        ));
    }
    // Other backends (nftables when available), against the iptables-nft baseline (row 0).
    for kind in BackendKind::ALL
        .into_iter()
        .filter(|k| *k != BackendKind::Iptables)
    {
        match backend::make(kind) {
            Ok(b) => {
                rows.push((
                    format!("ours {kind}, rules only"),
                    measure(n, rules_only(b.as_ref(), &cfg)),
                    Some(0),
                ));
                let r = Redirector::new(b);
                rows.push((
                    format!("ours {kind}, rules + policy route"),
                    measure(n, with_route(&r, &cfg)),
                    Some(0),
                ));
            }
            Err(e) => eprintln!("backend {kind} skipped: {e}"),
        }
    }

    println!("apply into a fresh netns, IPv4, DNS on; n = {n} per row");
    println!(
        "{:<52} {:>9} {:>9} {:>12}",
        "variant", "p50 ms", "p99 ms", "p50 vs base"
    );
    for (name, v, base) in &rows {
        let ratio = match base {
            Some(b) => format!("{:.2}x", ms(pct(v, 0.5)) / ms(pct(&rows[*b].1, 0.5))),
            None => "baseline".to_string(),
        };
        println!(
            "{name:<52} {:>9.2} {:>9.2} {ratio:>12}",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99))
        );
    }
}
