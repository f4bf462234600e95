//! Host probe SNAT over native nftables against the real kernel: the `hostprobe*` goldens list
//! back identically, set elements carry the pod UID as their comment, upsert replaces by IP,
//! removal works by UID, and re-applying the rules keeps the sets' elements.

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::process::Command;

use iptables_rules::nft::{NftHostProbe, ProbeEntry};
use iptables_rules::HostProbeConfig;

const TEST_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xe9ac, 0x1e77, 0x90ca, 0x399f, 0x4d6d, 0xece2, 0x2f9b, 0x3164,
);
/// The golden assumes the sets exist (Istio creates them separately); this is that step.
const SETS_PRELUDE: &str = "add table inet istio-ambient-nat
add set inet istio-ambient-nat istio-inpod-probes-v4 { type ipv4_addr ; }
add set inet istio-ambient-nat istio-inpod-probes-v6 { type ipv6_addr ; }
";

fn nft_stdin(text: &str) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn list_ruleset() -> String {
    let out = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .expect("run nft");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => format!(
                "{}counter{}",
                &l[..i],
                l[i..]
                    .splitn(6, ' ')
                    .nth(5)
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default()
            ),
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

fn cfg(ipv6: bool) -> HostProbeConfig {
    HostProbeConfig {
        ipv6,
        probe_snat_v6: TEST_SNAT_V6,
        kubelet_uid: Some(1000),
        ..HostProbeConfig::default()
    }
}

#[test]
fn hostprobe_goldens_list_back_identically() {
    if !have_goldens("hostprobe_goldens_list_back_identically") {
        return;
    }
    if !common::root_or_skip("nft_host") {
        return;
    }
    for (name, ipv6) in [("hostprobe", false), ("hostprobe_ipv6", true)] {
        let golden = std::fs::read_to_string(golden_path(name)).expect("golden");
        let want = common::in_fresh_netns(move || {
            nft_stdin(SETS_PRELUDE);
            nft_stdin(&golden);
            list_ruleset()
        });
        let got = common::in_fresh_netns(move || {
            NftHostProbe.apply(&cfg(ipv6)).expect("apply");
            list_ruleset()
        });
        assert!(want.contains("skuid 1000"), "{want}");
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn elements_carry_the_uid_like_nft_writes_them() {
    if !common::root_or_skip("nft_host") {
        return;
    }
    let want = common::in_fresh_netns(|| {
        nft_stdin(SETS_PRELUDE);
        nft_stdin(
            "add element inet istio-ambient-nat istio-inpod-probes-v4 { 10.0.0.1 comment \"uid-a\" }\n\
             add element inet istio-ambient-nat istio-inpod-probes-v6 { fd00::1 comment \"uid-a\" }\n",
        );
        list_ruleset()
    });
    let got = common::in_fresh_netns(|| {
        let h = NftHostProbe;
        // Sets only (no rules): same objects as the prelude.
        h.apply(&cfg(true)).expect("apply");
        h.upsert(
            "uid-a",
            &["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        )
        .expect("upsert");
        h.flush_rules().expect("flush");
        let l = list_ruleset();
        // The flushed table still has its (now empty) chain; drop it to compare with sets only.
        l.replace(
            "\n\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t}",
            "",
        )
    });
    assert_eq!(got, want);
}

#[test]
fn upsert_replaces_by_ip_and_removal_is_by_uid() {
    if !common::root_or_skip("nft_host") {
        return;
    }
    let (after_upserts, after_reapply, removed, after_remove, pruned, after_prune, listing) =
        common::in_fresh_netns(|| {
            let h = NftHostProbe;
            h.apply(&cfg(true)).expect("apply");
            let ip1: IpAddr = "10.0.0.1".parse().unwrap();
            let ip2: IpAddr = "fd00::1".parse().unwrap();
            let ip3: IpAddr = "10.0.0.3".parse().unwrap();
            h.upsert("uid-a", &[ip1, ip2]).expect("upsert a");
            h.upsert("uid-a", &[ip1, ip2]).expect("upsert a again");
            h.upsert("uid-b", &[ip1])
                .expect("upsert b: IP reused by a new pod");
            h.upsert("uid-c", &[ip3]).expect("upsert c");
            let mut after_upserts = h.entries().expect("entries");
            after_upserts.sort_by_key(|e| e.ip);
            h.apply(&cfg(true)).expect("re-apply rules");
            let mut after_reapply = h.entries().expect("entries");
            after_reapply.sort_by_key(|e| e.ip);
            let removed = h.remove_uid("uid-a").expect("remove a");
            let mut after_remove = h.entries().expect("entries");
            after_remove.sort_by_key(|e| e.ip);
            let pruned = h.prune_except(&[ip3]).expect("prune");
            let after_prune = h.entries().expect("entries");
            let listing = list_ruleset();
            h.remove().expect("remove table");
            h.remove().expect("remove absent table");
            assert_eq!(h.entries().expect("entries without table"), vec![]);
            (
                after_upserts,
                after_reapply,
                removed,
                after_remove,
                pruned,
                after_prune,
                listing,
            )
        });
    let e = |ip: &str, uid: &str| ProbeEntry {
        ip: ip.parse().unwrap(),
        uid: Some(uid.into()),
    };
    assert_eq!(
        after_upserts,
        vec![
            e("10.0.0.1", "uid-b"),
            e("10.0.0.3", "uid-c"),
            e("fd00::1", "uid-a")
        ]
    );
    assert_eq!(
        after_reapply, after_upserts,
        "re-applying the rules must keep the elements"
    );
    assert_eq!(removed, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        after_remove,
        vec![e("10.0.0.1", "uid-b"), e("10.0.0.3", "uid-c")]
    );
    assert_eq!(pruned, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(after_prune, vec![e("10.0.0.3", "uid-c")]);
    assert!(
        listing.contains("elements = { 10.0.0.3 comment \"uid-c\" }"),
        "{listing}"
    );
}

#[test]
fn host_rules_need_the_kubelet_uid() {
    let err = NftHostProbe::apply_batch(&HostProbeConfig::default()).expect_err("no uid");
    assert!(err.to_string().contains("kubelet UID"), "{err}");
}

#[test]
fn bulk_upsert_of_many_pods_in_one_transaction() {
    if !common::root_or_skip("nft_host") {
        return;
    }
    let n = common::in_fresh_netns(|| {
        let h = NftHostProbe;
        h.apply(&cfg(true)).expect("apply");
        // 1500 IPs -> 4500 objects in one transaction: every ACK must fit the receive buffer.
        let ips: Vec<IpAddr> = (0..1500u32)
            .map(|i| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()))
            .collect();
        h.upsert("uid-bulk", &ips).expect("bulk upsert");
        h.entries().expect("entries").len()
    });
    assert_eq!(n, 1500);
}
