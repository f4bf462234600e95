//! Faithful comparison (root): Istio's golden loaded into one fresh netns, ours into
//! another; what the kernel prints back (`*-save`, `nft list ruleset`) must be equal.

mod common;

use common::*;
use iptables_rules::model::Family;
use iptables_rules::{host_probe_ruleset, inpod_ruleset, normalize, render};

fn save_all(ns: &NamedNetns, save: &str) -> String {
    normalize::iptables_save_all(&ns.exec(&[save]))
}

fn compare_iptables_flavor(bin: &str) {
    let bin6 = bin.replacen("iptables", "ip6tables", 1);
    for (name, cfg) in inpod_cases() {
        let rs = inpod_ruleset(&cfg);
        let (g4, g6) = iptables_golden(&name);
        let golden = NamedNetns::new("gold");
        let ours = NamedNetns::new("ours");
        let restore4 = format!("{bin}-restore");
        let restore6 = format!("{bin6}-restore");
        golden.exec_stdin(&[&restore4, "--noflush"], &g4).unwrap();
        ours.exec_stdin(
            &[&restore4, "--noflush"],
            &render::iptables_restore(&rs, Family::V4),
        )
        .unwrap();
        if !g6.is_empty() {
            golden.exec_stdin(&[&restore6, "--noflush"], &g6).unwrap();
            ours.exec_stdin(
                &[&restore6, "--noflush"],
                &render::iptables_restore(&rs, Family::V6),
            )
            .unwrap();
        }
        for (save, fam) in [
            (format!("{bin}-save"), Family::V4),
            (format!("{bin6}-save"), Family::V6),
        ] {
            let g = save_all(&golden, &save);
            assert_eq!(
                save_all(&ours, &save),
                g,
                "{bin} {name} {fam:?}: kernel state differs"
            );
            // Our canonical save form (used to verify installed state) is what the kernel prints.
            assert_eq!(
                normalize::iptables_save(&golden.exec(&[&save])),
                render::iptables_save_expected(&rs, fam),
                "{bin} {name} {fam:?}: canonical save form"
            );
        }
    }
}

#[test]
fn iptables_nft_kernel_state_equals_goldens() {
    if !have_goldens("iptables_nft_kernel_state_equals_goldens") {
        return;
    }
    if root_or_skip("iptables_nft_kernel_state_equals_goldens") {
        compare_iptables_flavor("iptables-nft");
    }
}

#[test]
fn iptables_legacy_kernel_state_equals_goldens() {
    if !have_goldens("iptables_legacy_kernel_state_equals_goldens") {
        return;
    }
    if root_or_skip("iptables_legacy_kernel_state_equals_goldens") {
        compare_iptables_flavor("iptables-legacy");
    }
}

fn nft_load(ns: &NamedNetns, text: &str) -> String {
    ns.exec_stdin(&["nft", "-f", "-"], text).unwrap();
    normalize::nft_list(&ns.exec(&["nft", "list", "ruleset"]))
}

#[test]
fn nft_text_kernel_state_equals_goldens() {
    if !have_goldens("nft_text_kernel_state_equals_goldens") {
        return;
    }
    if !root_or_skip("nft_text_kernel_state_equals_goldens") {
        return;
    }
    for (name, cfg) in inpod_cases() {
        let golden = NamedNetns::new("gold");
        let ours = NamedNetns::new("ours");
        let g = nft_load(&golden, &nft_golden(&name));
        assert_eq!(
            nft_load(&ours, &render::nft_text(&inpod_ruleset(&cfg))),
            g,
            "{name}"
        );
    }
    // The host rules reference sets Istio creates separately: declare them first in both.
    let sets = "add table inet istio-ambient-nat\n\
                add set inet istio-ambient-nat istio-inpod-probes-v4 { type ipv4_addr ; }\n\
                add set inet istio-ambient-nat istio-inpod-probes-v6 { type ipv6_addr ; }\n";
    for (name, ipv6) in [("hostprobe", false), ("hostprobe_ipv6", true)] {
        let golden = NamedNetns::new("gold");
        let ours = NamedNetns::new("ours");
        let g = nft_load(&golden, &format!("{sets}{}", nft_golden(name)));
        let o = nft_load(
            &ours,
            &format!(
                "{sets}{}",
                render::nft_text(&host_probe_ruleset(&hostprobe_nft(ipv6)))
            ),
        );
        assert_eq!(o, g, "{name}");
    }
}
