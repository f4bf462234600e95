//! The controller over the fake effects (no root, milliseconds): namespace relabels,
//! plugin ADD/DEL keyed by container ID, the pending retry, the per-pod retry timer.

use super::*;
use crate::mesh::fakes::Fakes;
use serde_json::json;
use std::sync::atomic::Ordering::SeqCst;

struct NoSource;
#[tonic::async_trait]
impl PodSource for NoSource {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn run(self: Arc<Self>, _: mpsc::Sender<SourceEvent>) {}
    async fn get(&self, _: &str, _: &str) -> Result<Option<Found>, String> {
        Ok(None)
    }
}

fn pod_in(ns: &str, name: &str, uid: &str, version: usize) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid,
                         "resourceVersion": version.to_string()},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}]},
        }))
        .unwrap(),
    )
}

fn pod(version: usize) -> Arc<Pod> {
    pod_in("mesh", "web", "u-web", version)
}

fn namespace(name: &str, ambient: bool) -> SourceEvent {
    let labels = if ambient {
        [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into()
    } else {
        BTreeMap::new()
    };
    SourceEvent::Namespace {
        name: name.into(),
        labels,
    }
}

/// A controller over `fx`, namespace `mesh` in the mesh, not started.
fn controller(fx: &Fakes) -> Arc<Controller> {
    let ctl = Controller::new(
        Policy::default(),
        fx.enroller_with_ztunnel(),
        Arc::new(NoSource),
        Arc::new(ReconcileMetrics::new(&mut Default::default())),
    );
    ctl.absorb(&namespace("mesh", true));
    ctl
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn phase_of(ctl: &Controller, uid: &str) -> Option<Phase> {
    ctl.enroller.table.get(uid).map(|h| h.phase)
}

fn add_request(uid: &str, sandbox: &str) -> pb::AddRequest {
    pb::AddRequest {
        pod: Some(pb::PodRef {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: uid.into(),
            ..Default::default()
        }),
        netns: "/var/run/netns/cni-1".into(),
        ips: vec!["10.1.2.3/24".into()],
        attachment: Some(pb::Attachment {
            container_id: sandbox.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn del_request(uid: &str, sandbox: &str) -> pb::DelRequest {
    pb::DelRequest {
        pod: Some(pb::PodRef {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: uid.into(),
            ..Default::default()
        }),
        attachment: Some(pb::Attachment {
            container_id: sandbox.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_to_an_unenrollable_pod_share_one_retry_timer() {
    // No process of the pod is found: every reconcile fails with a retryable error.
    let fx = Fakes::new();
    let ctl = controller(&fx);
    for v in 0..100 {
        ctl.clone().handle(SourceEvent::Pod(pod(v)));
    }
    // Watch a few backoff rounds: never more than the one timer.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut most = 0;
    while tokio::time::Instant::now() < until {
        most = most.max(ctl.retry_timers());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most, 1, "one retry chain per pod");
    assert_eq!(ctl.retrying_pods(), 1);
    assert!(ctl.enroller.table.get("u-web").is_none());

    // Deleted: its state goes at once, its timer when it next wakes.
    ctl.clone().handle(SourceEvent::PodDeleted(pod(100)));
    assert_eq!(ctl.retrying_pods(), 0, "the retry map forgets deleted pods");
    let until = tokio::time::Instant::now() + RETRY_MAX + Duration::from_secs(1);
    while ctl.retry_timers() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctl.retry_timers(), 0, "no chain outlives its pod");
    assert_eq!(ctl.retrying_pods(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_timer_enrols_a_pod_once_its_processes_appear() {
    let fx = Fakes::new();
    let ctl = controller(&fx);
    ctl.clone().handle(SourceEvent::Pod(pod(1)));
    until("a retry is scheduled", || ctl.retrying_pods() == 1).await;
    assert_eq!(phase_of(&ctl, "u-web"), None);
    fx.netns.running.lock().unwrap().insert("u-web".into());
    until("the retry enrols it", || {
        phase_of(&ctl, "u-web") == Some(Phase::Enabled)
    })
    .await;
    until("the retry state goes", || ctl.retrying_pods() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_relabel_enrols_then_releases_its_running_pods() {
    let fx = Fakes::new();
    let ctl = controller(&fx);
    ctl.absorb(&namespace("shop", false));
    ctl.absorb(&SourceEvent::Pod(pod_in("shop", "cart", "u-cart", 1)));
    ctl.absorb(&SourceEvent::Pod(pod_in("mesh", "web", "u-web", 1)));
    fx.netns.running.lock().unwrap().insert("u-cart".into());

    ctl.clone().handle(namespace("shop", true));
    until("the relabelled namespace's pod is enrolled", || {
        phase_of(&ctl, "u-cart") == Some(Phase::Enabled)
    })
    .await;
    assert_eq!(
        phase_of(&ctl, "u-web"),
        None,
        "another namespace's pod is untouched"
    );
    assert_eq!(
        fx.log.starting("rules apply"),
        ["rules apply /proc/1/ns/net#u-cart"],
        "found by a /proc scan (no CNI event)"
    );

    ctl.clone().handle(namespace("shop", false));
    until("the pod is released", || {
        fx.log.starting("status u-cart -").len() == 1
    })
    .await;
    assert_eq!(phase_of(&ctl, "u-cart"), None);
    // A running pod leaving the mesh keeps running: its rules come out, its record goes.
    assert_eq!(
        fx.log.starting("rules remove"),
        ["rules remove /proc/1/ns/net#u-cart"]
    );
    assert!(fx.store.records.lock().unwrap().is_empty());
    assert_eq!(
        fx.log.starting("status u-cart"),
        ["status u-cart enabled", "status u-cart -"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_del_is_keyed_by_the_sandbox() {
    let fx = Fakes::new();
    let ctl = controller(&fx);
    ctl.absorb(&SourceEvent::Pod(pod(1)));
    ctl.ready.store(true, Ordering::Release);
    let got = PodHandler::add(ctl.as_ref(), add_request("u-web", "sandbox-2")).await;
    assert_eq!(got.unwrap(), pb::Decision::Captured);
    assert_eq!(phase_of(&ctl, "u-web"), Some(Phase::Enabled));

    // A late DEL of the replaced sandbox leaves the live one captured.
    PodHandler::del(ctl.as_ref(), del_request("u-web", "sandbox-1"))
        .await
        .unwrap();
    assert_eq!(phase_of(&ctl, "u-web"), Some(Phase::Enabled));
    assert!(fx.log.starting("ztunnel del").is_empty());
    // CHECK of the stale sandbox says so; of the live one, captured.
    let check = |sandbox: &str| pb::CheckRequest {
        pod: add_request("u-web", sandbox).pod,
        attachment: add_request("u-web", sandbox).attachment,
        ..Default::default()
    };
    assert!(
        !PodHandler::check(ctl.as_ref(), check("sandbox-1"))
            .await
            .unwrap()
            .ok
    );
    assert!(
        PodHandler::check(ctl.as_ref(), check("sandbox-2"))
            .await
            .unwrap()
            .ok
    );

    // The matching DEL releases it; its netns goes with the sandbox, so no rules removal.
    PodHandler::del(ctl.as_ref(), del_request("u-web", "sandbox-2"))
        .await
        .unwrap();
    assert_eq!(phase_of(&ctl, "u-web"), None);
    assert_eq!(fx.log.starting("ztunnel del"), ["ztunnel del u-web"]);
    assert!(fx.log.starting("rules remove").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_add_stays_pending_and_the_retry_loop_enables_it() {
    let fx = Fakes::new();
    let ctl = controller(&fx);
    ctl.absorb(&SourceEvent::Pod(pod(1)));
    ctl.ready.store(true, Ordering::Release);
    fx.ztunnel.nack.store(true, SeqCst);
    let got = PodHandler::add(ctl.as_ref(), add_request("u-web", "sandbox-1")).await;
    assert_eq!(got.unwrap_err().code(), tonic::Code::Unavailable);
    assert_eq!(phase_of(&ctl, "u-web"), Some(Phase::Pending));

    tokio::spawn(ctl.clone().retry_pending_loop());
    // Still nacked: announced again, still pending.
    until("a retry", || fx.log.starting("ztunnel add").len() >= 2).await;
    assert_eq!(phase_of(&ctl, "u-web"), Some(Phase::Pending));
    fx.ztunnel.nack.store(false, SeqCst);
    until("ztunnel takes it", || {
        phase_of(&ctl, "u-web") == Some(Phase::Enabled)
    })
    .await;
    assert_eq!(fx.log.starting("probes upsert"), ["probes upsert u-web"]);
}

/// A sidecar-injected pod `mesh/web` (uid `u-web`) with `annotations` added.
fn sidecar_pod(annotations: serde_json::Value) -> Arc<Pod> {
    let mut v = json!({
        "metadata": {"namespace": "mesh", "name": "web", "uid": "u-web",
                     "annotations": {"sidecar.istio.io/status": "{}"}},
        "spec": {"containers": [{"name": "app"},
                                {"name": "istio-proxy", "args": ["proxy", "sidecar"]}]},
        "status": {"phase": "Pending"},
    });
    for (k, val) in annotations.as_object().unwrap() {
        v["metadata"]["annotations"][k] = val.clone();
    }
    Arc::new(serde_json::from_value(v).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_pod_with_a_bad_annotation_is_refused_before_its_netns_is_touched() {
    let fx = Fakes::new();
    let ctl = controller(&fx);
    let metrics = Arc::new(super::super::sidecar_metrics::SidecarMetrics::default());
    ctl.set_sidecar(Arc::new(SidecarPath::new(
        iptables_rules::backend::BackendKind::Iptables,
        fx.netns.clone(),
        fx.status.clone(),
        metrics,
    )));
    let key = "sidecar.istio.io/interceptionMode";
    ctl.absorb(&SourceEvent::Pod(sidecar_pod(json!({key: "SPLICE"}))));
    ctl.ready.store(true, Ordering::Release);
    let err = PodHandler::add(ctl.as_ref(), add_request("u-web", "s1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    for want in ["mesh/web", key, "SPLICE"] {
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    // The Warning Event is posted after the answer; nothing else happened.
    until("the Event", || {
        fx.log.all() == ["event u-web SidecarRedirectionInvalid"]
    })
    .await;
    assert!(ctl.enroller.table.get("u-web").is_none(), "not held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_pods_pass_through_with_sidecar_mode_off_and_fail_without_a_sidecar_path() {
    let fx = Fakes::new();
    let off = Controller::new(
        Policy {
            sidecar_mode: false,
            ..Policy::default()
        },
        fx.enroller_with_ztunnel(),
        Arc::new(NoSource),
        Arc::new(ReconcileMetrics::new(&mut Default::default())),
    );
    off.absorb(&namespace("mesh", true));
    off.absorb(&SourceEvent::Pod(sidecar_pod(json!({}))));
    off.ready.store(true, Ordering::Release);
    let got = PodHandler::add(off.as_ref(), add_request("u-web", "s1")).await;
    assert_eq!(got.unwrap(), pb::Decision::NotInMesh);
    // Sidecar mode on but no sidecar path given: refused, never silently passed.
    let on = controller(&fx);
    on.absorb(&SourceEvent::Pod(sidecar_pod(json!({}))));
    on.ready.store(true, Ordering::Release);
    let err = PodHandler::add(on.as_ref(), add_request("u-web", "s1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(fx.log.all().is_empty(), "{:?}", fx.log.all());
}
