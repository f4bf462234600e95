//! Our generated text equals Istio's golden files (pure; no root).

mod common;

use common::*;
use iptables_rules::model::Family;
use iptables_rules::{host_probe_ruleset, inpod_ruleset, normalize, render};

/// Istio writes the UDP DNS redirect as `--to-port` (an accepted alias); we write `--to-ports`.
fn ipt_spelling(s: &str) -> String {
    s.replace("--to-port ", "--to-ports ")
}

#[test]
fn iptables_restore_text_equals_every_inpod_golden() {
    if !have_goldens("iptables_restore_text_equals_every_inpod_golden") {
        return;
    }
    for (name, cfg) in inpod_cases() {
        let rs = inpod_ruleset(&cfg);
        let (g4, g6) = iptables_golden(&name);
        assert_eq!(
            render::iptables_restore(&rs, Family::V4),
            ipt_spelling(&g4),
            "{name} v4"
        );
        assert_eq!(
            render::iptables_restore(&rs, Family::V6),
            ipt_spelling(&g6),
            "{name} v6"
        );
    }
}

#[test]
fn iptables_hostprobe_text_equals_golden() {
    if !have_goldens("iptables_hostprobe_text_equals_golden") {
        return;
    }
    for (name, ipv6) in [("hostprobe", false), ("hostprobe_ipv6", true)] {
        let rs = host_probe_ruleset(&hostprobe_iptables(ipv6));
        let (g4, g6) = iptables_golden(name);
        assert_eq!(render::iptables_restore(&rs, Family::V4), g4, "{name} v4");
        assert_eq!(render::iptables_restore(&rs, Family::V6), g6, "{name} v6");
    }
}

#[test]
fn nft_text_equals_every_inpod_golden() {
    if !have_goldens("nft_text_equals_every_inpod_golden") {
        return;
    }
    for (name, cfg) in inpod_cases() {
        let ours = normalize::nft_text(&render::nft_text(&inpod_ruleset(&cfg)));
        assert_eq!(ours, normalize::nft_text(&nft_golden(&name)), "{name}");
    }
}

#[test]
fn nft_hostprobe_text_equals_golden() {
    if !have_goldens("nft_hostprobe_text_equals_golden") {
        return;
    }
    for (name, ipv6) in [("hostprobe", false), ("hostprobe_ipv6", true)] {
        let ours =
            normalize::nft_text(&render::nft_text(&host_probe_ruleset(&hostprobe_nft(ipv6))));
        assert_eq!(ours, normalize::nft_text(&nft_golden(name)), "{name}");
    }
}

#[test]
fn ipv4_only_rulesets_render_no_ipv6_text() {
    let rs = inpod_ruleset(&iptables_rules::InpodConfig::default());
    assert!(render::iptables_restore(&rs, Family::V6).is_empty());
    assert!(rs.rules.iter().all(|r| r.family != Some(Family::V6)));
}
