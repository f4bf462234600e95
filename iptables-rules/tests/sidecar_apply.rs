//! Sidecar apply semantics (root): bad annotations install nothing, a failure mid-apply
//! leaves nothing, re-apply writes nothing, a different config replaces the old one exactly.

mod common;

use std::collections::BTreeMap;

use common::*;
use iptables_rules::backend::iptables::{Flavor, Iptables, Tools};
use iptables_rules::backend::BackendKind;
use iptables_rules::kernel_writes::KernelWrites;
use iptables_rules::normalize;
use iptables_rules::sidecar::apply::apply_iptables;
use iptables_rules::sidecar::{Applied, SidecarConfig, SidecarInputs, SidecarRedirector};

fn inputs(ann: &[(&str, &str)], env: &[(&str, &str)], ip: &str) -> SidecarInputs {
    let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    SidecarInputs {
        pod: "default/app".into(),
        annotations: map(ann),
        proxy_env: map(env),
        proxy_uid: None,
        proxy_gid: None,
        pod_ips: vec![ip.parse().unwrap()],
    }
}

/// Everything the netns shows of netfilter and policy routing.
fn snapshot(ns: &NamedNetns) -> String {
    let mut s = String::new();
    for cmd in [
        &["iptables-nft-save"][..],
        &["ip6tables-nft-save"],
        &["ip", "rule"],
        &["ip", "-6", "rule"],
        &["ip", "route", "show", "table", "133"],
        &["ip", "-6", "route", "show", "table", "133"],
    ] {
        // A never-used route table is an error to show, an emptied one is empty: both "none".
        let out = ns.exec_stdin(cmd, "").unwrap_or_default();
        s.push_str(&format!(
            "== {}\n{}\n",
            cmd.join(" "),
            normalize::iptables_save_all(&out)
        ));
    }
    s
}

/// [`snapshot`] plus the whole nf_tables ruleset (for the native backend; the chain order
/// iptables-nft leaves differs between a replaced and a fresh netns, so not for iptables).
fn snapshot_all(ns: &NamedNetns) -> String {
    let nft = ns.exec(&["nft", "list", "ruleset"]);
    format!("{}== nft\n{}\n", snapshot(ns), normalize::nft_list(&nft))
}

#[test]
fn sidecar_bad_annotations_are_refused_and_install_nothing() {
    if !root_or_skip("sidecar_bad_annotations_are_refused_and_install_nothing") {
        return;
    }
    let ns = NamedNetns::new("scbad");
    let before = snapshot(&ns);
    let bad = [
        ("traffic.sidecar.istio.io/excludeInboundPorts", "80,http"),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/40",
        ),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0,-x"),
        ("sidecar.istio.io/interceptionMode", "MAGIC"),
    ];
    for (key, value) in bad {
        // The agent's path: validation first; an error means apply is never reached.
        let err = SidecarConfig::from_inputs(&inputs(&[(key, value)], &[], "10.1.0.2"))
            .map(|cfg| SidecarRedirector::new(BackendKind::Iptables).apply(&ns.open(), &cfg))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("pod default/app") && msg.contains(key) && msg.contains(value),
            "{msg}"
        );
    }
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn sidecar_failure_in_the_second_family_leaves_nothing() {
    if !root_or_skip("sidecar_failure_in_the_second_family_leaves_nothing") {
        return;
    }
    let ns = NamedNetns::new("scfail");
    let before = snapshot(&ns);
    // A real IPv4 family and an IPv6 restore that fails (the one fake: a tool that exits 1).
    let ipt = Iptables::with_tools(
        Flavor::Nft,
        Tools::new("iptables-nft"),
        Some(Tools {
            bin: "ip6tables-nft".into(),
            save: "ip6tables-nft-save".into(),
            restore: "false".into(),
        }),
    );
    let cfg = SidecarConfig::from_inputs(&inputs(
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        &[("ISTIO_DUAL_STACK", "true")],
        "10.1.0.2",
    ))
    .unwrap();
    let mut dual = inputs(
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        &[("ISTIO_DUAL_STACK", "true")],
        "10.1.0.2",
    );
    dual.pod_ips.push("fd01::2".parse().unwrap());
    let dual = SidecarConfig::from_inputs(&dual).unwrap();
    assert!(!cfg.ipv6() && dual.ipv6());
    let err = apply_iptables(&ipt, &ns.open(), &dual)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&ns.path().display().to_string()) && err.contains("pod default/app"),
        "{err}"
    );
    assert!(err.contains("false --noflush"), "{err}");
    assert_eq!(
        snapshot(&ns),
        before,
        "IPv4 rules were not rolled back: {err}"
    );

    // The same with a previous config in place: it is what remains.
    assert_eq!(
        apply_iptables(&ipt, &ns.open(), &cfg).unwrap(),
        Applied::Installed
    );
    let with_old = snapshot(&ns);
    apply_iptables(&ipt, &ns.open(), &dual).unwrap_err();
    assert_eq!(snapshot(&ns), with_old);
}

#[test]
fn sidecar_failing_tproxy_route_rolls_back_the_rules() {
    if !root_or_skip("sidecar_failing_tproxy_route_rolls_back_the_rules") {
        return;
    }
    for kind in BackendKind::ALL {
        let ns = NamedNetns::new("scroute");
        // With lo down the IPv6 local route is refused (ENETDOWN) after the rules went in.
        ns.exec(&["ip", "link", "set", "lo", "down"]);
        let before = snapshot_all(&ns);
        let mut dual = inputs(
            &[("sidecar.istio.io/interceptionMode", "TPROXY")],
            &[("ISTIO_DUAL_STACK", "true")],
            "10.1.0.2",
        );
        dual.pod_ips.push("fd01::2".parse().unwrap());
        let cfg = SidecarConfig::from_inputs(&dual).unwrap();
        let err = SidecarRedirector::new(kind)
            .apply(&ns.open(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&ns.name) && err.contains("table 133"),
            "{kind}: {err}"
        );
        assert_eq!(
            snapshot_all(&ns),
            before,
            "{kind}: failed apply left state: {err}"
        );
    }
}

#[test]
fn sidecar_reapply_writes_nothing_and_a_new_config_replaces_the_old() {
    if !root_or_skip("sidecar_reapply_writes_nothing_and_a_new_config_replaces_the_old") {
        return;
    }
    let r = SidecarRedirector::new(BackendKind::Iptables);
    let ns = NamedNetns::new("screapply");
    let pod = ns.open();
    let basic = SidecarConfig::from_inputs(&inputs(&[], &[], "10.1.0.2")).unwrap();
    let other = SidecarConfig::from_inputs(&inputs(
        &[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.9.0.0/16",
            ),
        ],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
        "10.1.0.2",
    ))
    .unwrap();
    assert_eq!(r.apply(&pod, &basic).unwrap(), Applied::Installed);
    assert!(r.matches(&pod, &basic).unwrap());
    assert!(!r.matches(&pod, &other).unwrap());

    // Re-ADD: nothing reaches the kernel (iptables-nft writes through nf_tables).
    let writes = pod.run(|| KernelWrites::open_here(None)).unwrap().unwrap();
    writes.drain().unwrap();
    assert_eq!(r.apply(&pod, &basic).unwrap(), Applied::AlreadyPresent);
    assert!(!writes.drain().unwrap(), "re-apply wrote to the kernel");

    // A different config replaces the old one: the result equals a fresh netns's.
    assert_eq!(r.apply(&pod, &other).unwrap(), Applied::Installed);
    assert!(r.matches(&pod, &other).unwrap() && !r.matches(&pod, &basic).unwrap());
    let fresh = NamedNetns::new("scfresh");
    r.apply(&fresh.open(), &other).unwrap();
    assert_eq!(snapshot(&ns), snapshot(&fresh));
    // And back: TPROXY's route stays (Istio never removes it either), the rules are basic's.
    assert_eq!(r.apply(&pod, &basic).unwrap(), Applied::Installed);
    assert!(r.matches(&pod, &basic).unwrap());
}

#[test]
fn sidecar_conflicting_chain_is_replaced() {
    if !root_or_skip("sidecar_conflicting_chain_is_replaced") {
        return;
    }
    let r = SidecarRedirector::new(BackendKind::Iptables);
    let ns = NamedNetns::new("scconflict");
    // Someone left an ISTIO_OUTPUT with other rules and a jump to it.
    ns.exec_stdin(
        &["iptables-nft-restore", "--noflush"],
        "*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -p udp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ACCEPT\nCOMMIT\n",
    )
    .unwrap();
    let cfg = SidecarConfig::from_inputs(&inputs(&[], &[], "10.1.0.2")).unwrap();
    assert!(!r.matches(&ns.open(), &cfg).unwrap());
    assert_eq!(r.apply(&ns.open(), &cfg).unwrap(), Applied::Installed);
    assert!(r.matches(&ns.open(), &cfg).unwrap());
    let fresh = NamedNetns::new("scfresh");
    r.apply(&fresh.open(), &cfg).unwrap();
    assert_eq!(snapshot(&ns), snapshot(&fresh));
}

#[test]
fn sidecar_nft_uses_its_own_tables_reapplies_as_a_no_op_and_replaces() {
    if !root_or_skip("sidecar_nft_uses_its_own_tables_reapplies_as_a_no_op_and_replaces") {
        return;
    }
    let r = SidecarRedirector::new(BackendKind::Nftables);
    let ns = NamedNetns::new("scnft");
    let pod = ns.open();
    let dns = SidecarConfig::from_inputs(&inputs(
        &[],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
        "10.1.0.2",
    ))
    .unwrap();
    assert_eq!(r.apply(&pod, &dns).unwrap(), Applied::Installed);
    assert_eq!(
        ns.exec(&["nft", "list", "tables"]),
        "table ip istio-proxy-nat\ntable ip istio-proxy-raw\n"
    );
    assert!(r.matches(&pod, &dns).unwrap());

    let writes = pod.run(|| KernelWrites::open_here(None)).unwrap().unwrap();
    writes.drain().unwrap();
    assert_eq!(r.apply(&pod, &dns).unwrap(), Applied::AlreadyPresent);
    assert!(!writes.drain().unwrap(), "re-apply wrote to the kernel");

    // TPROXY, dual stack: replaces the tables in one transaction; equals a fresh netns's.
    let mut dual = inputs(
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        &[("ISTIO_DUAL_STACK", "true")],
        "10.1.0.2",
    );
    dual.pod_ips.push("fd01::2".parse().unwrap());
    let dual = SidecarConfig::from_inputs(&dual).unwrap();
    assert_eq!(r.apply(&pod, &dual).unwrap(), Applied::Installed);
    assert!(r.matches(&pod, &dual).unwrap() && !r.matches(&pod, &dns).unwrap());
    let fresh = NamedNetns::new("scnftfresh");
    r.apply(&fresh.open(), &dual).unwrap();
    let list = |n: &NamedNetns| normalize::nft_list(&n.exec(&["nft", "list", "ruleset"]));
    assert_eq!(list(&ns), list(&fresh));
    assert!(!list(&ns).contains("istio-ambient"));
    assert!(
        list(&ns).contains("table ip6 istio-proxy-mangle"),
        "{}",
        list(&ns)
    );
}
