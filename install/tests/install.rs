//! Install / convert / repair / cleanup on real files in temp dirs, for every fixture.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use ambient_cni_install::merge::{self, EntryState};
use ambient_cni_install::{
    BinaryOutcome, ConfigOutcome, InstallError, Installer, PluginEntry, ShutdownMode,
};
use common::{golden, Node};

/// (fixture, the file that must hold our entry after install, what install must do)
const CASES: &[(&str, &str, &str)] = &[
    ("cilium", "05-cilium.conflist", "inserted"),
    ("calico", "10-calico.conflist", "inserted"),
    ("flannel", "10-flannel.conflist", "inserted"),
    ("kindnet", "10-kindnet.conflist", "inserted"),
    ("compact", "10-compact.conflist", "inserted"),
    ("bridge", "10-mynet.conflist", "converted"),
    ("several", "10-calico.conflist", "inserted"),
    ("invalid", "10-flannel.conflist", "inserted"),
    ("stale-entry", "10-calico.conflist", "inserted"),
];

#[test]
fn install_and_uninstall_every_fixture_against_goldens() {
    for (case, target, action) in CASES {
        let node = Node::new(case);
        let before = node.snapshot();
        let inst = node.installer(None);
        assert!(!inst.is_installed().unwrap(), "{case}");

        let out = inst.install_once().unwrap();
        assert_eq!(out.binary, BinaryOutcome::Copied, "{case}");
        let target_path = node.conf.join(target);
        match *action {
            "inserted" => assert_eq!(
                out.config,
                ConfigOutcome::Inserted {
                    path: target_path.clone()
                }
            ),
            _ => assert!(
                matches!(out.config, ConfigOutcome::Converted { ref to, .. } if *to == target_path)
            ),
        }
        let text = node.read(target);
        assert_eq!(
            merge::entry_state(&text, &PluginEntry::default()).unwrap(),
            EntryState::Current
        );
        assert_eq!(
            merge::plugin_types(&text).unwrap().last().unwrap(),
            "ambient-cni",
            "{case}: last"
        );
        assert_eq!(
            fs::metadata(&target_path).unwrap().permissions().mode() & 0o777,
            0o640,
            "{case}: mode kept"
        );
        let bin = node.bin.join("ambient-cni");
        assert_eq!(fs::read(&bin).unwrap(), fs::read(&node.plugin).unwrap());
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        golden(&format!("{case}.installed"), &node.snapshot());

        // A second pass writes nothing.
        let again = inst.install_once().unwrap();
        assert!(!again.wrote(), "{case}: second pass wrote {again:?}");
        assert!(inst.is_installed().unwrap());

        let un = inst.uninstall().unwrap();
        assert_eq!(un.edited, vec![target_path.clone()], "{case}");
        assert!(!bin.exists());
        assert_eq!(
            fs::read_dir(&node.bin).unwrap().count(),
            0,
            "{case}: bin dir clean"
        );
        let after = node.snapshot();
        golden(&format!("{case}.uninstalled"), &after);
        if *action == "inserted" && *case != "stale-entry" {
            assert_eq!(after, before, "{case}: uninstall restores every byte");
        }
    }
}

#[test]
fn only_the_primary_is_edited() {
    for case in ["several", "invalid"] {
        let node = Node::new(case);
        let before: Vec<(String, String)> = fs::read_dir(&node.conf)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        let out = node.installer(None).install_once().unwrap();
        let ConfigOutcome::Inserted { path } = out.config else {
            panic!("{out:?}")
        };
        for (name, text) in before {
            if node.conf.join(&name) != path {
                assert_eq!(node.read(&name), text, "{case}: {name} must be untouched");
            }
        }
    }
}

#[test]
fn empty_dir_waits_for_a_primary() {
    let node = Node::new("empty");
    let inst = node.installer(None);
    let out = inst.install_once().unwrap();
    assert_eq!(out.config, ConfigOutcome::WaitingForPrimary);
    assert!(!out.is_installed());
    assert!(node.bin.join("ambient-cni").exists(), "binary goes first");
    assert_eq!(
        fs::read_dir(&node.conf).unwrap().count(),
        0,
        "nothing written to the conf dir"
    );
    // A missing conf dir is the same as an empty one.
    fs::remove_dir(&node.conf).unwrap();
    assert_eq!(
        inst.install_once().unwrap().config,
        ConfigOutcome::WaitingForPrimary
    );
}

#[test]
fn missing_bin_dir_and_plugin_are_named() {
    let node = Node::new("flannel");
    let mut cfg = node.config(None);
    cfg.plugin_source = PathBuf::from("/nonexistent/ambient-cni");
    let e = Installer::new(cfg)
        .unwrap()
        .install_once()
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/ambient-cni"), "{e}");
    let mut cfg = node.config(None);
    cfg.cni_bin_dir = node.dir.path().join("no-bin");
    let e = Installer::new(cfg)
        .unwrap()
        .install_once()
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-bin"), "{e}");
}

#[test]
fn bad_settings_are_rejected() {
    let node = Node::new("flannel");
    for owned in ["../x.conflist", "x.conf", ""] {
        let mut cfg = node.config(Some(owned));
        cfg.owned_conf = Some(owned.into());
        assert!(
            matches!(Installer::new(cfg), Err(InstallError::Setting(_))),
            "{owned}"
        );
    }
}

#[test]
fn changed_settings_refresh_the_entry() {
    let node = Node::new("calico");
    node.installer(None).install_once().unwrap();
    let mut cfg = node.config(None);
    cfg.entry.exclude_namespaces = vec!["kube-system".into(), "monitoring".into()];
    let inst = Installer::new(cfg.clone()).unwrap();
    assert!(!inst.is_installed().unwrap());
    assert!(inst.install_once().unwrap().wrote());
    let text = node.read("10-calico.conflist");
    assert_eq!(
        merge::entry_state(&text, &cfg.entry).unwrap(),
        EntryState::Current
    );
    assert_eq!(
        merge::plugin_types(&text).unwrap(),
        vec!["calico", "portmap", "bandwidth", "ambient-cni"]
    );
}

#[test]
fn conf_name_overrides_the_lexical_choice() {
    let node = Node::new("several");
    let mut cfg = node.config(None);
    cfg.conf_name = Some("20-flannel.conflist".into());
    let out = Installer::new(cfg.clone()).unwrap().install_once().unwrap();
    assert_eq!(
        out.config,
        ConfigOutcome::Inserted {
            path: node.conf.join("20-flannel.conflist")
        }
    );
    cfg.conf_name = Some("01-notype.conf".into());
    node.write("01-notype.conf", r#"{"name":"x"}"#);
    let e = Installer::new(cfg).unwrap().install_once().unwrap_err();
    assert!(matches!(e, InstallError::NamedConf { .. }), "{e}");
    assert!(e.to_string().contains("01-notype.conf"), "{e}");
}

#[test]
fn owned_mode_leaves_the_primary_alone() {
    let node = Node::new("cilium");
    let primary_before = node.read("05-cilium.conflist");
    let inst = node.installer(Some("02-ambient-cni.conflist"));
    let out = inst.install_once().unwrap();
    assert!(
        matches!(out.config, ConfigOutcome::OwnedWritten { .. }),
        "{out:?}"
    );
    assert_eq!(node.read("05-cilium.conflist"), primary_before);
    let owned = node.read("02-ambient-cni.conflist");
    assert_eq!(
        merge::plugin_types(&owned).unwrap(),
        vec!["cilium-cni", "ambient-cni"]
    );
    assert_eq!(
        owned,
        merge::insert(&primary_before, &PluginEntry::default()).unwrap()
    );
    golden("cilium.owned", &node.snapshot());
    assert!(!inst.install_once().unwrap().wrote());

    // Cilium rewrites its file with new settings: our copy follows.
    node.write(
        "05-cilium.conflist",
        &primary_before.replace("\"enable-debug\": false", "\"enable-debug\": true"),
    );
    assert!(!inst.is_installed().unwrap());
    inst.install_once().unwrap();
    assert!(node
        .read("02-ambient-cni.conflist")
        .contains("\"enable-debug\": true"));

    // A file that sorts before ours would win: say so, naming both.
    node.write(
        "01-other.conflist",
        r#"{"name":"o","plugins":[{"type":"bridge"}]}"#,
    );
    let e = inst.install_once().unwrap_err();
    assert!(matches!(e, InstallError::OwnedNotFirst { .. }));
    assert!(
        e.to_string().contains("01-other.conflist")
            && e.to_string().contains("02-ambient-cni.conflist"),
        "{e}"
    );
    fs::remove_file(node.conf.join("01-other.conflist")).unwrap();

    let un = inst.uninstall().unwrap();
    assert!(un
        .removed
        .contains(&node.conf.join("02-ambient-cni.conflist")));
    assert!(!node.read("05-cilium.conflist").contains("ambient-cni"));
    assert_eq!(fs::read_dir(&node.conf).unwrap().count(), 1);
}

#[test]
fn owned_mode_converts_a_single_conf_without_touching_it() {
    let node = Node::new("bridge");
    let before = node.read("10-mynet.conf");
    node.installer(Some("00-ambient-cni.conflist"))
        .install_once()
        .unwrap();
    assert_eq!(node.read("10-mynet.conf"), before);
    let owned = node.read("00-ambient-cni.conflist");
    assert_eq!(
        merge::plugin_types(&owned).unwrap(),
        vec!["bridge", "ambient-cni"]
    );
}

#[test]
fn chained_mode_removes_a_leftover_owned_file() {
    let node = Node::new("cilium");
    node.installer(Some("02-ambient-cni.conflist"))
        .install_once()
        .unwrap();
    let inst = node.installer(None);
    assert!(!inst.is_installed().unwrap());
    inst.install_once().unwrap();
    assert!(!node.conf.join("02-ambient-cni.conflist").exists());
    assert!(inst.is_installed().unwrap());
    assert_eq!(
        merge::plugin_types(&node.read("05-cilium.conflist")).unwrap(),
        vec!["cilium-cni", "ambient-cni"]
    );
}

#[test]
fn shutdown_upgrade_keeps_everything_uninstall_cleans() {
    let node = Node::new("flannel");
    let before = node.snapshot();
    let inst = node.installer(None);
    inst.install_once().unwrap();
    let installed = node.snapshot();
    let out = inst.shutdown(ShutdownMode::Upgrade).unwrap();
    assert_eq!(out, Default::default());
    assert_eq!(node.snapshot(), installed);
    assert!(node.bin.join("ambient-cni").exists());
    inst.shutdown(ShutdownMode::Uninstall).unwrap();
    assert_eq!(node.snapshot(), before);
    assert!(!node.bin.join("ambient-cni").exists());
}

#[test]
fn uninstall_cleans_entries_left_in_non_primary_files_and_temp_leftovers() {
    let node = Node::new("several");
    // An older install chained into flannel's file (it was the primary then).
    let fl = node.read("20-flannel.conflist");
    node.write(
        "20-flannel.conflist",
        &merge::insert(&fl, &PluginEntry::default()).unwrap(),
    );
    fs::write(node.bin.join("ambient-cni.tmp.4242.0"), "half a binary").unwrap();
    let inst = node.installer(None);
    inst.install_once().unwrap();
    let un = inst.uninstall().unwrap();
    assert_eq!(un.edited.len(), 2, "{un:?}");
    assert_eq!(node.read("20-flannel.conflist"), fl);
    assert_eq!(fs::read_dir(&node.bin).unwrap().count(), 0);
}

#[test]
fn an_interrupted_conversion_is_finished_and_a_foreign_conflist_is_not_clobbered() {
    // Crash after writing the .conflist, before removing the .conf: finish the job.
    let node = Node::new("bridge");
    let conv = merge::convert(&node.read("10-mynet.conf"), &PluginEntry::default()).unwrap();
    node.write("10-mynet.conflist", &conv);
    let out = node.installer(None).install_once().unwrap();
    assert!(
        matches!(out.config, ConfigOutcome::Converted { .. }),
        "{out:?}"
    );
    assert!(!node.conf.join("10-mynet.conf").exists());
    assert_eq!(node.read("10-mynet.conflist"), conv);

    // Someone else's X.conflist next to the primary X.conf: refuse, naming both files.
    let node = Node::new("bridge");
    node.write(
        "10-mynet.conflist",
        r#"{"name":"other","plugins":[{"type":"ptp"}]}"#,
    );
    let e = node.installer(None).install_once().unwrap_err().to_string();
    assert!(
        e.contains("10-mynet.conflist") && e.contains("10-mynet.conf:"),
        "{e}"
    );
}

#[test]
fn a_conflist_that_chains_istio_cni_is_refused_until_it_is_removed() {
    let node = Node::new("istio-cni");
    let before = node.snapshot();
    let err = node.installer(None).install_once().unwrap_err().to_string();
    assert!(
        err.contains("10-calico.conflist") && err.contains("istio-cni") && err.contains("remove"),
        "{err}"
    );
    assert_eq!(
        node.snapshot(),
        before,
        "nothing written while istio-cni is chained"
    );

    // What uninstalling istio-cni leaves: the primary's entries only. Then we chain.
    let text = node.read("10-calico.conflist");
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "istio-cni");
    node.write(
        "10-calico.conflist",
        &serde_json::to_string_pretty(&v).unwrap(),
    );
    node.installer(None).install_once().unwrap();
    assert_eq!(
        merge::plugin_types(&node.read("10-calico.conflist")).unwrap(),
        ["calico", "portmap", "ambient-cni"]
    );
}
