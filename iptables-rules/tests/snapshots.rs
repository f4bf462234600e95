//! Our rendered rules for every in-pod variant and the host probe rules, pinned as files in
//! the repository (`tests/snapshots/`), so a change to what we install shows up in review even
//! where Istio's goldens are absent. Pure; no root.
//!
//! After an intended change: `UPDATE_SNAPSHOTS=1 cargo test -p iptables-rules --test snapshots`,
//! then review the diff of `tests/snapshots/`.

mod common;

use std::path::PathBuf;

use common::*;
use iptables_rules::model::Family;
use iptables_rules::{host_probe_ruleset, inpod_ruleset, render};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots")
}

/// Every (file name, rendered text) we pin.
fn rendered() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, cfg) in inpod_cases() {
        let rs = inpod_ruleset(&cfg);
        let ipt = format!(
            "{}{}",
            render::iptables_restore(&rs, Family::V4),
            render::iptables_restore(&rs, Family::V6)
        );
        out.push((format!("{name}.iptables"), ipt));
        out.push((format!("{name}.nft"), render::nft_text(&rs)));
    }
    for (name, ipv6) in [("hostprobe", false), ("hostprobe_ipv6", true)] {
        let ipt = host_probe_ruleset(&hostprobe_iptables(ipv6));
        out.push((
            format!("{name}.iptables"),
            format!(
                "{}{}",
                render::iptables_restore(&ipt, Family::V4),
                render::iptables_restore(&ipt, Family::V6)
            ),
        ));
        let nft = host_probe_ruleset(&hostprobe_nft(ipv6));
        out.push((format!("{name}.nft"), render::nft_text(&nft)));
    }
    out
}

#[test]
fn rendered_rules_match_the_snapshots() {
    let update = std::env::var_os("UPDATE_SNAPSHOTS").is_some();
    let mut stale = Vec::new();
    for (file, text) in rendered() {
        let path = dir().join(&file);
        if update {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == text => {}
            Ok(_) => stale.push(format!("{file}: differs")),
            Err(e) => stale.push(format!("{file}: {e}")),
        }
    }
    assert!(
        stale.is_empty(),
        "rendered rules differ from tests/snapshots (review, then UPDATE_SNAPSHOTS=1): {stale:#?}"
    );
}

#[test]
fn every_snapshot_file_is_still_rendered() {
    let names: Vec<String> = rendered().into_iter().map(|(f, _)| f).collect();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(names.contains(&name), "stale snapshot file {name}");
    }
}
