//! Drift detection against the real kernel: in a fresh netns (made with `unshare` on a thread),
//! apply a pod's capture, tamper with it the ways issue 19 lists (flush, delete, replace a rule
//! by another, delete the policy route / fwmark rule, remove a probe-set element), and check that
//! the read-only verification names exactly what drifted, writes nothing, and that the ADD apply
//! repairs it.

mod common;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::process::Command;
use std::time::Duration;

use iptables_rules::backend::{make, BackendKind};
use iptables_rules::drift::{compare_probe, kinds, DriftKind, Finding};
use iptables_rules::kernel_writes::KernelWrites;
use iptables_rules::model::Family;
use iptables_rules::netns::Netns;
use iptables_rules::nft::host::NftHostProbe;
use iptables_rules::{HostProbeConfig, InpodConfig, Redirector};

/// A fresh netns with `lo` up, held by its fd (gone when the test drops it; no name to clean up).
fn fresh_netns(tag: &str) -> Netns {
    let fd: OwnedFd = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let f = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        f.into()
    })
    .join()
    .unwrap();
    let ns = Netns::from_fd(fd, format!("drift-{tag}")).unwrap();
    sh(&ns, &["ip", "link", "set", "lo", "up"]);
    ns
}

/// Runs a command inside `ns` (a child forked from a thread in it); panics on failure.
fn sh(ns: &Netns, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = ns
        .run(move || Command::new(&args[0]).args(&args[1..]).output())
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The handle of the first rule of an nft chain (from `nft -a list chain`).
fn first_handle(ns: &Netns, table: &str, chain: &str) -> String {
    let text = sh(ns, &["nft", "-a", "list", "chain", "inet", table, chain]);
    text.lines()
        .filter(|l| !l.contains("chain ") && !l.contains("type "))
        .find_map(|l| l.split("# handle ").nth(1))
        .map(|h| h.trim().to_owned())
        .expect("a rule with a handle")
}

/// Listeners in `ns` for nf_tables and route/rule changes: anything they hear is a write.
fn watch_writes(ns: &Netns) -> KernelWrites {
    ns.run(|| KernelWrites::open_here(None)).unwrap().unwrap()
}

fn nothing_written(w: &KernelWrites) -> bool {
    std::thread::sleep(Duration::from_millis(50));
    !w.drain().unwrap()
}

fn redirector(kind: BackendKind) -> Option<Redirector> {
    match make(kind) {
        Ok(b) => Some(Redirector::new(b)),
        Err(e) => {
            assert!(
                kind != BackendKind::Nftables,
                "nftables backend must always exist: {e}"
            );
            eprintln!("skipping {kind}: {e}");
            None
        }
    }
}

/// Applies, verifies clean (no writes), tampers with `tamper`, expects `want` kinds, repairs.
fn case(kind: BackendKind, name: &str, tamper: &[&[&str]], want: &[DriftKind]) -> Vec<Finding> {
    let Some(r) = redirector(kind) else {
        return Vec::new();
    };
    let ns = fresh_netns(name);
    let cfg = InpodConfig::default();
    r.apply(&ns, &cfg).unwrap();
    let watch = watch_writes(&ns);
    assert_eq!(r.verify(&ns, &cfg).unwrap(), vec![], "{kind} {name}: clean");
    assert!(
        nothing_written(&watch),
        "{kind} {name}: verification wrote to the kernel"
    );
    for cmd in tamper {
        sh(&ns, cmd);
    }
    assert!(
        !nothing_written(&watch),
        "{kind} {name}: the watch must see the tampering (else it proves nothing)"
    );
    let drift = r.verify(&ns, &cfg).unwrap();
    assert_eq!(kinds(&drift), want, "{kind} {name}: {drift:?}");
    r.apply(&ns, &cfg).unwrap();
    assert_eq!(
        r.verify(&ns, &cfg).unwrap(),
        vec![],
        "{kind} {name}: repaired"
    );
    drift
}

#[test]
fn nft_flushed_or_deleted_table_is_drift_and_apply_repairs() {
    if !common::root_or_skip("drift") {
        return;
    }
    let d = case(
        BackendKind::Nftables,
        "flush",
        &[&["nft", "flush", "table", "inet", "istio-ambient-nat"]],
        &[DriftKind::Rules],
    );
    assert!(d.iter().all(
        |f| matches!(f, Finding::LineMissing { section, .. } if section == "inet istio-ambient-nat")
    ));
    let d = case(
        BackendKind::Nftables,
        "ruleset",
        &[&["nft", "flush", "ruleset"]],
        &[DriftKind::Rules],
    );
    assert!(d.contains(&Finding::SectionMissing {
        section: "inet istio-ambient-mangle".into()
    }));
}

#[test]
fn nft_rule_replaced_by_another_is_a_change() {
    if !common::root_or_skip("drift") {
        return;
    }
    let Some(r) = redirector(BackendKind::Nftables) else {
        return;
    };
    let ns = fresh_netns("replace");
    let cfg = InpodConfig::default();
    r.apply(&ns, &cfg).unwrap();
    let h = first_handle(&ns, "istio-ambient-nat", "istio-output");
    sh(
        &ns,
        &[
            "nft",
            "replace",
            "rule",
            "inet",
            "istio-ambient-nat",
            "istio-output",
            "handle",
            &h,
            "tcp",
            "dport",
            "9",
            "accept",
        ],
    );
    let drift = r.verify(&ns, &cfg).unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert!(
        matches!(&drift[0], Finding::LineChanged { section, .. } if section == "inet istio-ambient-nat"),
        "{drift:?}"
    );
    // A rule of ours left in place but with an extra one before it is drift too.
    r.apply(&ns, &cfg).unwrap();
    sh(
        &ns,
        &[
            "nft",
            "insert",
            "rule",
            "inet",
            "istio-ambient-nat",
            "istio-output",
            "accept",
        ],
    );
    let drift = r.verify(&ns, &cfg).unwrap();
    assert!(
        matches!(drift.as_slice(), [Finding::LineExtra { .. }]),
        "{drift:?}"
    );
    r.apply(&ns, &cfg).unwrap();
    assert_eq!(r.verify(&ns, &cfg).unwrap(), vec![]);
}

#[test]
fn deleted_policy_route_and_fwmark_rule_are_drift() {
    if !common::root_or_skip("drift") {
        return;
    }
    for kind in BackendKind::ALL {
        let d = case(
            kind,
            "route",
            &[&[
                "ip",
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ]],
            &[DriftKind::Route],
        );
        if !d.is_empty() {
            assert_eq!(d, vec![Finding::RouteMissing { family: Family::V4 }]);
        }
        case(
            kind,
            "rule",
            &[&[
                "ip",
                "rule",
                "del",
                "fwmark",
                "0x111/0xfff",
                "pref",
                "32764",
                "lookup",
                "100",
            ]],
            &[DriftKind::FwmarkRule],
        );
    }
}

#[test]
fn iptables_flushed_or_replaced_rules_are_drift() {
    if !common::root_or_skip("drift") {
        return;
    }
    // The flavour `make` picks (iptables-nft here) and its binary for tampering.
    let bin = match iptables_rules::backend::iptables::Iptables::detect() {
        Ok(i) => i.tools(Family::V4).unwrap().bin.clone(),
        Err(e) => {
            eprintln!("skipping iptables: {e}");
            return;
        }
    };
    case(
        BackendKind::Iptables,
        "ipt-flush",
        &[&[&bin, "-t", "nat", "-F"], &[&bin, "-t", "mangle", "-F"]],
        &[DriftKind::Rules],
    );
    let d = case(
        BackendKind::Iptables,
        "ipt-replace",
        &[&[&bin, "-t", "nat", "-R", "ISTIO_OUTPUT", "1", "-j", "ACCEPT"]],
        &[DriftKind::Rules],
    );
    assert!(
        matches!(d.as_slice(), [Finding::LineChanged { section, found, .. }] if section == "ipv4 nat" && found == "-A ISTIO_OUTPUT -j ACCEPT"),
        "{d:?}"
    );
}

#[test]
fn removed_probe_set_element_is_found_and_restored() {
    if !common::root_or_skip("drift") {
        return;
    }
    let ns = fresh_netns("probe");
    let ips: Vec<IpAddr> = vec!["10.9.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
    let probe = NftHostProbe;
    let cfg = HostProbeConfig {
        kubelet_uid: Some(1000),
        ..HostProbeConfig::default()
    };
    let ips2 = ips.clone();
    let check = move |ns: &Netns| {
        let ips = ips2.clone();
        ns.run(move || {
            let all = compare_probe(&NftHostProbe.entries().unwrap(), "uid-1", &ips);
            // The per-pod lookup (what the verifier uses) agrees with a dump of the whole set.
            assert_eq!(
                compare_probe(&NftHostProbe.lookup(&ips).unwrap(), "uid-1", &ips),
                all
            );
            all
        })
        .unwrap()
    };
    let ips3 = ips.clone();
    ns.run(move || {
        // No table or set yet: nothing found, no error.
        assert_eq!(NftHostProbe.lookup(&ips3).unwrap(), vec![]);
        probe.apply(&cfg).unwrap();
        probe.upsert("uid-1", &ips3).unwrap();
    })
    .unwrap();
    assert_eq!(check(&ns), vec![]);
    sh(
        &ns,
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "istio-ambient-nat",
            "istio-inpod-probes-v4",
            "{ 10.9.0.7 }",
        ],
    );
    assert_eq!(check(&ns), vec![Finding::ProbeMissing { ip: ips[0] }]);
    let ips4 = ips.clone();
    ns.run(move || NftHostProbe.upsert("uid-1", &ips4).unwrap())
        .unwrap();
    assert_eq!(check(&ns), vec![]);
}
