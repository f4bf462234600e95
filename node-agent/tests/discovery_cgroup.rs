//! The cgroup parser on realistic `/proc/<pid>/cgroup` files of each runtime/driver layout.

use std::path::PathBuf;

use ambient_cni_agent::discovery::cgroup::{pod_uid, CgroupError};

const UID: &str = "7c1f5e2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b";

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cgroup")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn pod_processes_of_every_layout() {
    for f in [
        "containerd-systemd-v2.cgroup",
        "containerd-cgroupfs-v1.cgroup",
        "crio-systemd-hybrid.cgroup",
        "kind-nested-v2.cgroup",
        "docker-in-docker-v1.cgroup",
    ] {
        assert_eq!(pod_uid(&fixture(f)).unwrap().as_deref(), Some(UID), "{f}");
    }
}

#[test]
fn non_pod_processes() {
    for f in [
        "host-systemd-service-v2.cgroup",
        "kubelet-v1.cgroup",
        "crio-conmon-v2.cgroup",
        "qos-slice-only-v2.cgroup",
    ] {
        assert_eq!(pod_uid(&fixture(f)).unwrap(), None, "{f}");
    }
}

#[test]
fn two_pods_in_one_process_is_an_error() {
    let err = pod_uid(&fixture("conflicting-pods-v1.cgroup")).unwrap_err();
    assert!(matches!(err, CgroupError::Conflict(..)), "{err}");
    assert!(err.to_string().contains(UID), "{err}");
}
