//! Sidecar mode against Istio's eight CNI goldens: our restore payload is Istio's text,
//! and (root) what the kernel prints back after our apply equals what it prints after
//! Istio's payload, for iptables-nft and iptables-legacy.

mod common;

use std::collections::BTreeMap;

use common::*;
use iptables_rules::backend::iptables::{Flavor, Iptables};
use iptables_rules::model::Family;
use iptables_rules::normalize;
use iptables_rules::sidecar::apply::{apply_iptables, matches_iptables};
use iptables_rules::sidecar::canon::{expected_state, state_from_save};
use iptables_rules::sidecar::generate::rules;
use iptables_rules::sidecar::{Applied, SidecarConfig, SidecarInputs};

/// The pod inputs of each golden (Istio's `plugin_dryrun_test.go`, see the goldens' README).
fn cases() -> Vec<(&'static str, SidecarInputs)> {
    let pod = |ann: &[(&str, &str)], env: &[(&str, &str)], uid: Option<i64>, gid: Option<i64>| {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut annotations = map(ann);
        annotations.insert("sidecar.istio.io/status".into(), "true".into());
        SidecarInputs {
            pod: "default/golden".into(),
            annotations,
            proxy_env: map(env),
            proxy_uid: uid,
            proxy_gid: gid,
            pod_ips: vec!["10.244.1.9".parse().unwrap()],
        }
    };
    let tproxy = ("sidecar.istio.io/interceptionMode", "TPROXY");
    vec![
        ("basic", pod(&[], &[], None, None)),
        // A root proxy falls back to 1337: the same rules as basic.
        ("basic", pod(&[], &[], Some(0), Some(0))),
        (
            "include-exclude-ip",
            pod(
                &[
                    (
                        "traffic.sidecar.istio.io/includeOutboundIPRanges",
                        "127.0.0.0/8",
                    ),
                    (
                        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                        "10.0.0.0/8",
                    ),
                ],
                &[],
                None,
                None,
            ),
        ),
        (
            "include-exclude-ports",
            pod(
                &[
                    ("traffic.sidecar.istio.io/includeInboundPorts", "1111,2222"),
                    ("traffic.sidecar.istio.io/excludeInboundPorts", "3333,4444"),
                    ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,6666"),
                ],
                &[],
                None,
                None,
            ),
        ),
        ("tproxy", pod(&[tproxy], &[], None, None)),
        (
            "dns",
            pod(&[], &[("ISTIO_META_DNS_CAPTURE", "true")], None, None),
        ),
        (
            "invalid-drop",
            pod(&[], &[("INVALID_DROP", "true")], None, None),
        ),
        (
            "custom-uid",
            pod(&[], &[], Some(1000670000), Some(1000670001)),
        ),
        (
            "custom-uid-tproxy",
            pod(&[tproxy], &[], Some(1000670000), Some(1000670001)),
        ),
    ]
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(sidecar_goldens().join(format!("{name}.txt.golden"))).unwrap()
}

#[test]
fn sidecar_restore_text_equals_istio_goldens() {
    if !have_sidecar_goldens("sidecar_restore_text_equals_istio_goldens") {
        return;
    }
    for (name, inputs) in cases() {
        let cfg = SidecarConfig::from_inputs(&inputs).unwrap();
        assert_eq!(cfg.iptables_restore(Family::V4), golden(name), "{name}");
        assert_eq!(cfg.iptables_restore(Family::V6), "", "{name}: IPv4 pod");
    }
}

fn compare_flavor(flavor: Flavor, bin: &str) {
    let ipt = Iptables::with_binary(flavor, bin);
    let save = format!("{bin}-save");
    let restore = format!("{bin}-restore");
    for (name, inputs) in cases() {
        let cfg = SidecarConfig::from_inputs(&inputs).unwrap();
        let gold = NamedNetns::new("scgold");
        let ours = NamedNetns::new("scours");
        gold.exec_stdin(&[&restore, "--noflush"], &golden(name))
            .unwrap();
        assert_eq!(
            apply_iptables(&ipt, &ours.open(), &cfg).unwrap(),
            Applied::Installed,
            "{bin} {name}"
        );
        let g = gold.exec(&[&save]);
        assert_eq!(
            normalize::iptables_save_all(&ours.exec(&[&save])),
            normalize::iptables_save_all(&g),
            "{bin} {name}: kernel state differs from Istio's"
        );
        // Our pure save form is what the kernel prints, so "already installed" is exact.
        let (v4, _) = rules(&cfg);
        assert_eq!(
            state_from_save(&g),
            expected_state(&v4, Family::V4),
            "{bin} {name}: canonical save form"
        );
        // A pod istio-cni programmed already matches: re-ADD after a migration writes nothing.
        assert!(
            matches_iptables(&ipt, &gold.open(), &cfg).unwrap() || cfg.mode().as_str() == "TPROXY",
            "{bin} {name}"
        );
    }
}

#[test]
fn sidecar_iptables_nft_kernel_state_equals_goldens() {
    let t = "sidecar_iptables_nft_kernel_state_equals_goldens";
    if have_sidecar_goldens(t) && root_or_skip(t) {
        compare_flavor(Flavor::Nft, "iptables-nft");
    }
}

#[test]
fn sidecar_iptables_legacy_kernel_state_equals_goldens() {
    let t = "sidecar_iptables_legacy_kernel_state_equals_goldens";
    if have_sidecar_goldens(t) && root_or_skip(t) {
        compare_flavor(Flavor::Legacy, "iptables-legacy");
    }
}

/// Istio's rule-generator cases (`tests/sidecar_tool_goldens/`) a pod's annotations can
/// express, with the annotations that give the tool's flags; `v6` pods get IPv6 rules too.
fn tool_cases() -> Vec<(&'static str, SidecarInputs)> {
    let pod = |v6: bool, extra: &[(&str, &str)], env: &[(&str, &str)]| {
        // The tool's test defaults: no outbound capture by CIDR, no inbound ports, no
        // excluded outbound ports.
        let mut annotations: BTreeMap<String, String> = [
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", ""),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            annotations.insert(k.to_string(), v.to_string());
        }
        let ip = if v6 { "fd00:10:244::9" } else { "10.244.1.9" };
        SidecarInputs {
            pod: "default/tool".into(),
            annotations,
            proxy_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pod_ips: vec![ip.parse().unwrap()],
            ..SidecarInputs::default()
        }
    };
    let ports = ("traffic.sidecar.istio.io/includeInboundPorts", "4000,5000");
    let vifs = ("istio.io/reroute-virtual-interfaces", "eth0,eth1");
    let vifs12 = ("istio.io/reroute-virtual-interfaces", "eth1,eth2");
    let ten = (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "10.0.0.0/8",
    );
    let ports32 = (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "32000,31000",
    );
    let out32 = (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "32000,31000",
    );
    let tproxy = ("sidecar.istio.io/interceptionMode", "TPROXY");
    vec![
        ("empty", pod(false, &[], &[])),
        (
            "kube-virt-interfaces",
            pod(
                false,
                &[
                    vifs12,
                    ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
                ],
                &[],
            ),
        ),
        ("ipnets", pod(false, &[ten], &[])),
        (
            "ipnets-with-kube-virt-interfaces",
            pod(false, &[vifs12, ten], &[]),
        ),
        ("inbound-ports-include", pod(false, &[ports32], &[])),
        ("inbound-ports-tproxy", pod(false, &[ports32, tproxy], &[])),
        ("outbound-ports-include", pod(false, &[out32], &[])),
        (
            "basic-exclude-nic",
            pod(
                false,
                &[(
                    "traffic.sidecar.istio.io/excludeInterfaces",
                    "not-istio-nic",
                )],
                &[],
            ),
        ),
        ("drop-invalid", pod(false, &[], &[("INVALID_DROP", "true")])),
        ("ipv6-empty-inbound-ports", pod(true, &[], &[])),
        ("ipv6-inbound-ports", pod(true, &[ports], &[])),
        ("ipv6-virt-interfaces", pod(true, &[ports, vifs], &[])),
        (
            "ipv6-ipnets",
            pod(
                true,
                &[
                    ports,
                    vifs,
                    ("traffic.sidecar.istio.io/excludeInboundPorts", "6000,7000,"),
                    (
                        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                        "2001:db8::/32",
                    ),
                    (
                        "traffic.sidecar.istio.io/includeOutboundIPRanges",
                        "2001:db8::/32",
                    ),
                ],
                &[],
            ),
        ),
        ("ipv6-outbound-ports", pod(true, &[out32], &[])),
    ]
}

/// A tool golden's restore payloads: (IPv4, IPv6; empty when the case has none).
fn tool_golden(name: &str) -> (String, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sidecar_tool_goldens")
        .join(format!("{name}.golden"));
    let text = std::fs::read_to_string(path).unwrap();
    // The executed commands around the payloads are `iptables-save`/`ip6tables-save`;
    // the IPv6 payload starts at the second occurrence of the first table header.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.ends_with("tables-save") && !l.is_empty())
        .collect();
    let split = lines
        .iter()
        .skip(1)
        .position(|l| *l == lines[0])
        .map(|i| i + 1)
        .unwrap_or(lines.len());
    let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    (join(&lines[..split]), join(&lines[split..]))
}

#[test]
fn sidecar_tool_goldens_restore_text_equals_istio() {
    for (name, inputs) in tool_cases() {
        let cfg = SidecarConfig::from_inputs(&inputs).unwrap();
        let (g4, g6) = tool_golden(name);
        assert_eq!(cfg.ipv6(), !g6.is_empty(), "{name}");
        assert_eq!(cfg.iptables_restore(Family::V4), g4, "{name} IPv4");
        assert_eq!(cfg.iptables_restore(Family::V6), g6, "{name} IPv6");
    }
}

#[test]
fn sidecar_tool_goldens_kernel_state_equals_istio() {
    if !root_or_skip("sidecar_tool_goldens_kernel_state_equals_istio") {
        return;
    }
    let ipt = Iptables::with_binary(Flavor::Nft, "iptables-nft");
    for (name, inputs) in tool_cases() {
        let cfg = SidecarConfig::from_inputs(&inputs).unwrap();
        let (g4, g6) = tool_golden(name);
        let gold = NamedNetns::new("sctgold");
        let ours = NamedNetns::new("sctours");
        gold.exec_stdin(&["iptables-nft-restore", "--noflush"], &g4)
            .unwrap();
        if !g6.is_empty() {
            gold.exec_stdin(&["ip6tables-nft-restore", "--noflush"], &g6)
                .unwrap();
        }
        apply_iptables(&ipt, &ours.open(), &cfg).unwrap();
        for save in ["iptables-nft-save", "ip6tables-nft-save"] {
            assert_eq!(
                normalize::iptables_save_all(&ours.exec(&[save])),
                normalize::iptables_save_all(&gold.exec(&[save])),
                "{name} {save}"
            );
        }
        let (v4, v6) = rules(&cfg);
        assert_eq!(
            state_from_save(&gold.exec(&["iptables-nft-save"])),
            expected_state(&v4, Family::V4),
            "{name}: canonical IPv4 save form"
        );
        assert_eq!(
            state_from_save(&gold.exec(&["ip6tables-nft-save"])),
            expected_state(&v6, Family::V6),
            "{name}: canonical IPv6 save form"
        );
        // TPROXY also wants its route, which a bare restore does not add.
        if cfg.mode().as_str() == "REDIRECT" {
            assert!(
                matches_iptables(&ipt, &gold.open(), &cfg).unwrap(),
                "{name}"
            );
        }
        assert!(
            matches_iptables(&ipt, &ours.open(), &cfg).unwrap(),
            "{name}"
        );
    }
}
