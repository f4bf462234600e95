//! The sidecar race repair, in place, in a real netns: a sidecar pod whose `istio-validation`
//! failed (126) because its netns has no rules is found broken, repaired once (Istio's rules
//! installed with the agent's backend), after which the same check passes; a pod with a bad
//! annotation is refused with nothing written to its netns.
//!
//! Needs root; skips otherwise (fails when `CI` is set). Each netns is made by a thread's
//! `unshare` and held by an fd: nothing is left behind, also on failure.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use ambient_cni_agent::mesh::policy::Policy;
use ambient_cni_agent::mesh::sidecar_policy::{decide, Mode as PodMode};
use ambient_cni_agent::pods::PodId;
use ambient_cni_agent::sidecar_repair::broken::BrokenFilter;
use ambient_cni_agent::sidecar_repair::effects::{FindNetns, NodeEffects};
use ambient_cni_agent::sidecar_repair::metrics::RepairMetrics;
use ambient_cni_agent::sidecar_repair::repairer::{
    IsSidecar, Outcome, RepairEffects, Repairer, REASON_REPAIR,
};
use ambient_cni_agent::sidecar_repair::settings::Mode;
use iptables_rules::backend::BackendKind;
use iptables_rules::netns::Netns;
use iptables_rules::sidecar::SidecarRedirector;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_ambient-cni-agent");

fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs these tests as root"
    );
    eprintln!("skipped: needs root (netns, rules)");
    false
}

/// A pod netns: `lo` up and `ip` on a veth, held by an fd of this process.
struct PodNs {
    _keep: OwnedFd,
    path: PathBuf,
    ns: Netns,
}

fn pod_netns(ip: &str) -> PodNs {
    let fd: OwnedFd = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap()
            .into()
    })
    .join()
    .unwrap();
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ));
    let ns = Netns::open(&path, None).unwrap();
    let p = PodNs {
        _keep: fd,
        path,
        ns,
    };
    for args in [
        vec!["ip", "link", "set", "lo", "up"],
        vec![
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
        vec!["ip", "link", "set", "peer0", "up"],
        vec!["ip", "link", "set", "eth0", "up"],
        vec!["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    ] {
        p.sh(&args);
    }
    p
}

impl PodNs {
    fn sh(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self
            .ns
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

    /// `validate-sidecar` in this netns as the proxy uid: its exit status.
    fn validate(&self) -> i32 {
        let out = self
            .ns
            .run(|| {
                Command::new(AGENT)
                    .args(["validate-sidecar", "--probe-timeout", "1"])
                    .uid(1337)
                    .gid(1337)
                    .output()
            })
            .unwrap()
            .unwrap();
        out.status.code().unwrap_or(-1)
    }

    /// What the netns holds (both backends' readback).
    fn rules(&self) -> String {
        self.sh(&["iptables-save"]) + &self.sh(&["nft", "list", "ruleset"])
    }
}

/// An injected pod (as Istio's injector shapes it with CNI on) whose validation failed.
fn broken_pod(uid: &str, ip: &str, annotations: serde_json::Value) -> Pod {
    let mut ann = json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"});
    if let (Some(a), Some(extra)) = (ann.as_object_mut(), annotations.as_object()) {
        a.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("web-{uid}"), "namespace": "shop", "uid": uid,
                      "annotations": ann},
        "spec": {
            "initContainers": [{"name": "istio-validation", "image": "x",
                                "securityContext": {"runAsUser": 1337}}],
            "containers": [
                {"name": "app", "image": "x"},
                {"name": "istio-proxy", "image": "x", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
            ]
        },
        "status": {
            "phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}],
            "initContainerStatuses": [{
                "name": "istio-validation", "image": "x", "imageID": "", "ready": false,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}
            }]
        }
    }))
    .unwrap()
}

/// Real effects, with the Events kept for the test (no API server here).
struct Recording {
    inner: NodeEffects,
    events: Mutex<Vec<(bool, String, String)>>,
}

#[tonic::async_trait]
impl RepairEffects for Recording {
    async fn redirect(&self, pod: &Pod) -> Result<String, String> {
        self.inner.redirect(pod).await
    }
    async fn delete(&self, pod: &Pod) -> Result<(), String> {
        self.inner.delete(pod).await
    }
    async fn label(&self, pod: &Pod, key: &str, value: &str) -> Result<(), String> {
        self.inner.label(pod, key, value).await
    }
    async fn event(&self, _: &PodId, warning: bool, reason: &str, message: &str) {
        let mut e = self.events.lock().unwrap();
        e.push((warning, reason.to_string(), message.to_string()));
    }
}

fn filter() -> BrokenFilter {
    BrokenFilter {
        sidecar_annotation: "sidecar.istio.io/status".into(),
        init_container_name: "istio-validation".into(),
        termination_message: String::new(),
        exit_code: 126,
    }
}

/// A repair controller whose netns finder knows the test's pods by UID.
fn repairer(
    kind: BackendKind,
    netns: HashMap<String, PathBuf>,
) -> (Repairer, Arc<Recording>, Arc<RepairMetrics>) {
    let find: FindNetns = Arc::new(move |uid: &str, _ips: &[std::net::IpAddr]| {
        let path = netns.get(uid).ok_or(format!("no netns for {uid}"))?;
        Netns::open(Path::new(path), None).map_err(|e| e.to_string())
    });
    let effects = Arc::new(Recording {
        inner: NodeEffects {
            find,
            rules: SidecarRedirector::new(kind),
            client: None,
            events: None,
        },
        events: Mutex::new(Vec::new()),
    });
    let policy = Policy::default();
    let is_sidecar: IsSidecar =
        Arc::new(move |pod, labels| decide(&policy, pod, labels) == PodMode::Sidecar);
    let metrics = Arc::new(RepairMetrics::new(&mut Default::default()));
    let r = Repairer::new(
        Mode::Repair,
        filter(),
        is_sidecar,
        effects.clone(),
        metrics.clone(),
    );
    (r, effects, metrics)
}

fn repairs_in_place(kind: BackendKind) {
    let ns = pod_netns("10.44.0.5");
    assert_eq!(ns.validate(), 126, "no rules yet: the validation fails");

    let pod = broken_pod("u-1", "10.44.0.5", json!({}));
    let (r, effects, metrics) = repairer(kind, [("u-1".to_string(), ns.path.clone())].into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = rt.block_on(r.pass(&mut [&pod].into_iter(), &HashMap::new()));
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].1, Outcome::Success, "{done:?}");
    assert_eq!(metrics.get("repair", "success"), 1);
    {
        let ev = effects.events.lock().unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(!ev[0].0, "a repair is a Normal event: {ev:?}");
        assert_eq!(ev[0].1, REASON_REPAIR);
    }
    assert_eq!(ns.validate(), 0, "repaired: the same check passes");

    // Once per UID: the pod stays broken-looking until its init container restarts.
    let before = ns.rules();
    let again = rt.block_on(r.pass(&mut [&pod].into_iter(), &HashMap::new()));
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(ns.rules(), before);
    assert_eq!(metrics.get("repair", "success"), 1);
}

#[test]
fn a_broken_sidecar_pod_is_repaired_in_place_once_iptables() {
    if !root_or_skip() {
        return;
    }
    repairs_in_place(BackendKind::Iptables);
}

#[test]
fn a_broken_sidecar_pod_is_repaired_in_place_once_nftables() {
    if !root_or_skip() {
        return;
    }
    repairs_in_place(BackendKind::Nftables);
}

#[test]
fn a_bad_annotation_is_refused_with_nothing_written() {
    if !root_or_skip() {
        return;
    }
    let ns = pod_netns("10.44.1.5");
    let before = ns.rules();
    let pod = broken_pod(
        "u-bad",
        "10.44.1.5",
        json!({"traffic.sidecar.istio.io/includeInboundPorts": "80,http"}),
    );
    // Not a sidecar pod (no annotation filter match) is not even looked at.
    let mut plain = broken_pod("u-plain", "10.44.1.6", json!({}));
    plain.metadata.annotations = None;
    let (r, effects, metrics) = repairer(
        BackendKind::Iptables,
        [("u-bad".to_string(), ns.path.clone())].into(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let done = rt.block_on(r.pass(&mut [&pod, &plain].into_iter(), &HashMap::new()));
    assert_eq!(done.len(), 1, "{done:?}");
    match &done[0].1 {
        Outcome::Fail(e) => {
            assert!(e.contains("shop/web-u-bad"), "{e}");
            assert!(e.contains("includeInboundPorts"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(metrics.get("repair", "fail"), 1);
    let ev = effects.events.lock().unwrap().clone();
    assert!(
        ev.len() == 1 && ev[0].0 && ev[0].1 == REASON_REPAIR,
        "{ev:?}"
    );
    assert_eq!(ns.rules(), before, "nothing half-applied");
    assert_eq!(ns.validate(), 126);
}
