//! Native nftables backend against the real kernel: every Istio nft golden variant must list back
//! (`nft list ruleset`) exactly as the golden does; apply is idempotent and atomic; remove
//! leaves nothing. Each case runs in fresh network namespaces made with `unshare` on a thread.

mod common;

use std::process::Command;

use iptables_rules::backend::nftables::NftablesBackend;
use iptables_rules::backend::{make, BackendKind, RulesBackend};
use iptables_rules::nft::{Batch, Expr, NftError, NftSocket};
use iptables_rules::{inpod_ruleset, InpodConfig};

/// `nft list ruleset` of the calling thread's netns, counters normalized.
fn list_ruleset() -> String {
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft list ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// `nft --debug=netlink list ruleset`: the bytecode of every rule, as the kernel reports it.
fn list_bytecode() -> String {
    let out = Command::new("nft")
        .args(["--debug=netlink", "list", "ruleset"])
        .output()
        .expect("run nft");
    assert!(
        out.status.success(),
        "nft list ruleset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rule headers read `inet <table> <chain> <handle> [<previous handle>]`: handles are not identity.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            if l.starts_with("inet ") {
                l.split(' ').take(3).collect::<Vec<_>>().join(" ")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_owned()
}

/// Replaces `counter packets N bytes M` by `counter`.
fn normalize(s: &str) -> String {
    s.lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => {
                let rest = &l[i + "counter packets ".len()..];
                let after = rest.split_once(" bytes ").map(|(_, b)| b).unwrap_or("");
                let tail = after.split_once(' ').map(|(_, t)| t).unwrap_or("");
                format!("{}counter {}", &l[..i], tail).trim_end().to_owned()
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

use common::{goldens, have_goldens};

/// One of Istio's nftables goldens.
fn golden_path(name: &str) -> std::path::PathBuf {
    goldens().join("nftables").join(format!("{name}.golden"))
}

/// What `nft -f <golden>` lists back in a fresh netns.
fn golden_listing(name: &str) -> String {
    golden_listing_and_bytecode(name).0
}

/// Listing and bytecode of a golden loaded with `nft -f` into a fresh netns.
fn golden_listing_and_bytecode(name: &str) -> (String, String) {
    let path = golden_path(name);
    assert!(path.exists(), "golden {} missing", path.display());
    common::in_fresh_netns(move || {
        let out = Command::new("nft")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run nft -f");
        assert!(
            out.status.success(),
            "nft -f {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        (list_ruleset(), list_bytecode())
    })
}

/// What our backend lists back (text and bytecode) in a fresh netns after applying `cfg`.
fn our_listing_and_bytecode(cfg: InpodConfig) -> (String, String) {
    common::in_fresh_netns(move || {
        NftablesBackend.apply(&cfg).expect("apply");
        (list_ruleset(), list_bytecode())
    })
}

fn variants() -> Vec<(&'static str, InpodConfig)> {
    let base = InpodConfig::default();
    let vifs = vec!["fake1s0f0".to_owned(), "fake1s0f1".to_owned()];
    let mut v = vec![
        (
            "default",
            InpodConfig {
                dns_capture: true,
                ..base.clone()
            },
        ),
        (
            "dns_pod_enabled_and_off_globally",
            InpodConfig {
                dns_capture: true,
                ..base.clone()
            },
        ),
        (
            "dns_pod_disabled_and_on_globally",
            InpodConfig {
                dns_capture: false,
                ..base.clone()
            },
        ),
        (
            "ingress",
            InpodConfig {
                dns_capture: false,
                bypass_inbound: true,
                ..base.clone()
            },
        ),
        (
            "virtual_interfaces",
            InpodConfig {
                dns_capture: false,
                virtual_interfaces: vifs.clone(),
                ..base.clone()
            },
        ),
        (
            "ingress_and_virtual_interfaces",
            InpodConfig {
                dns_capture: false,
                bypass_inbound: true,
                virtual_interfaces: vifs,
                ..base.clone()
            },
        ),
    ];
    let v6: Vec<_> = v
        .iter()
        .map(|(n, c)| {
            let name: &'static str = Box::leak(format!("{n}_ipv6").into_boxed_str());
            (
                name,
                InpodConfig {
                    ipv6: true,
                    probe_snat_v6: common::test_snat_v6(),
                    ..c.clone()
                },
            )
        })
        .collect();
    v.extend(v6);
    v
}

#[test]
fn every_golden_variant_lists_back_identically() {
    if !have_goldens("every_golden_variant_lists_back_identically") {
        return;
    }
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let mut failures = Vec::new();
    for (name, cfg) in variants() {
        let (want, want_code) = golden_listing_and_bytecode(name);
        let (got, got_code) = our_listing_and_bytecode(cfg);
        assert!(
            want.contains("table inet istio-ambient-nat"),
            "{name}: golden listing empty?\n{want}"
        );
        assert!(
            want_code.contains("[ immediate reg 0 jump -> istio-output ]"),
            "{name}: no bytecode?"
        );
        if want != got {
            failures.push(format!("== {name}\n-- golden:\n{want}\n-- ours:\n{got}"));
        }
        // Same bytecode too, not just the same printed text.
        if want_code != got_code {
            failures.push(format!(
                "== {name} (bytecode)\n-- golden:\n{want_code}\n-- ours:\n{got_code}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn make_returns_the_native_backend() {
    let b = make(BackendKind::Nftables).expect("make nftables");
    assert_eq!(b.kind(), BackendKind::Nftables);
}

#[test]
fn apply_twice_keeps_one_copy_and_reconfigures() {
    if !have_goldens("apply_twice_keeps_one_copy_and_reconfigures") {
        return;
    }
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let want_default = golden_listing("default");
    let want_dns_off = golden_listing("dns_pod_disabled_and_on_globally");
    let (twice, switched, installed_ok, installed_stale) = common::in_fresh_netns(|| {
        let b = NftablesBackend;
        let dflt = InpodConfig::default();
        b.apply(&dflt).expect("apply 1");
        b.apply(&dflt).expect("apply 2");
        let twice = list_ruleset();
        let ok = b.installed(&dflt).expect("installed");
        let off = InpodConfig {
            dns_capture: false,
            ..InpodConfig::default()
        };
        b.apply(&off).expect("apply dns off");
        let switched = list_ruleset();
        let stale = b.installed(&dflt).expect("installed");
        (twice, switched, ok, stale)
    });
    assert_eq!(twice, want_default);
    // The raw table disappears when DNS capture is turned off (not left behind).
    assert_eq!(switched, want_dns_off);
    assert!(installed_ok.matches_expected);
    assert_eq!(installed_ok.sections.len(), 3);
    assert!(!installed_stale.matches_expected);
    assert_eq!(installed_stale.sections.len(), 2);
}

#[test]
fn remove_leaves_an_empty_ruleset_and_tolerates_absence() {
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let (after_remove, after_second, installed) = common::in_fresh_netns(|| {
        let b = NftablesBackend;
        let cfg = InpodConfig {
            ipv6: true,
            ..InpodConfig::default()
        };
        b.remove(&cfg).expect("remove on an empty netns");
        b.apply(&cfg).expect("apply");
        b.remove(&cfg).expect("remove");
        let after_remove = list_ruleset();
        b.remove(&cfg).expect("remove again");
        (
            after_remove,
            list_ruleset(),
            b.installed(&cfg).expect("installed"),
        )
    });
    assert_eq!(after_remove, "");
    assert_eq!(after_second, "");
    assert!(installed.is_empty());
    assert!(!installed.matches_expected);
}

#[test]
fn remove_keeps_foreign_tables() {
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let listing = common::in_fresh_netns(|| {
        let out = Command::new("nft")
            .args(["add", "table", "inet", "someone-else"])
            .output()
            .expect("nft");
        assert!(out.status.success());
        let b = NftablesBackend;
        b.apply(&InpodConfig::default()).expect("apply");
        b.remove(&InpodConfig::default()).expect("remove");
        list_ruleset()
    });
    assert_eq!(listing.trim(), "table inet someone-else {\n}");
}

#[test]
fn failing_transaction_keeps_previous_state_and_names_the_object() {
    if !have_goldens("failing_transaction_keeps_previous_state_and_names_the_object") {
        return;
    }
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let want = golden_listing("default");
    let (err, listing) = common::in_fresh_netns(|| {
        let b = NftablesBackend;
        b.apply(&InpodConfig::default()).expect("apply");
        // The full re-apply (flush included) plus one rule jumping to a chain that does not exist.
        let cfg = InpodConfig {
            dns_capture: false,
            ..InpodConfig::default()
        };
        let mut batch: Batch = NftablesBackend::batch_for(&inpod_ruleset(&cfg)).expect("batch");
        batch.add_rule(
            iptables_rules::nft::consts::NFPROTO_INET,
            "istio-ambient-nat",
            "istio-output",
            &[
                Expr::Counter,
                Expr::Verdict(iptables_rules::nft::Verdict::Jump("no-such-chain".into())),
            ],
        );
        let mut sock = NftSocket::open().expect("socket");
        let err = sock.commit(batch).expect_err("bad batch must fail");
        (err, list_ruleset())
    });
    match &err {
        NftError::Object { object, source, .. } => {
            assert!(
                object.starts_with("add rule inet istio-ambient-nat istio-output"),
                "{object}"
            );
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(listing, want, "state changed by a failed transaction");
}

#[test]
fn invalid_config_is_rejected_before_touching_the_kernel() {
    if !common::root_or_skip("nft_backend") {
        return;
    }
    let (res, listing) = common::in_fresh_netns(|| {
        let cfg = InpodConfig {
            virtual_interfaces: vec!["this-name-is-too-long-for-linux".into()],
            ..InpodConfig::default()
        };
        (NftablesBackend.apply(&cfg), list_ruleset())
    });
    let err = res.expect_err("must fail");
    assert!(
        err.to_string().contains("this-name-is-too-long-for-linux"),
        "{err}"
    );
    assert_eq!(listing, "");
}
