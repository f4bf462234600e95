//! The enrolment steps over the fake effects (no root, milliseconds): their order, a
//! nack leaving the pod pending until a retry, failures that leave nothing half done,
//! and releases keyed by the sandbox.

use super::*;
use crate::mesh::fakes::Fakes;
use std::sync::atomic::Ordering::SeqCst;

fn id(uid: &str) -> PodId {
    PodId {
        namespace: "mesh".into(),
        name: format!("pod-{uid}"),
        uid: uid.into(),
    }
}

fn request(uid: &str, sandbox: Option<&str>) -> Request {
    Request {
        id: id(uid),
        service_account: "default".into(),
        netns_path: Some(format!("/var/run/netns/{uid}")),
        ips: vec!["10.1.2.3".parse().unwrap()],
        cfg: InpodConfig::default(),
        container_id: sandbox.map(str::to_owned),
    }
}

fn phase(e: &Enroller, uid: &str) -> Option<Phase> {
    e.table.get(uid).map(|h| h.phase)
}

#[test]
fn enrolment_results_name_the_failed_step() {
    let err = EnrollError::Ztunnel {
        pod: id("u"),
        msg: "m".into(),
    };
    assert_eq!(enrolment_result(&Err(err)), "pending");
    assert_eq!(enrolment_result(&Ok(())), "enabled");
}

#[tokio::test]
async fn add_runs_netns_rules_record_ztunnel_probes_status_in_order() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    e.add(request("u1", Some("c1"))).await.unwrap();
    assert_eq!(
        fx.log.all(),
        [
            "netns /var/run/netns/u1",
            "rules apply /var/run/netns/u1",
            "record save u1",
            "ztunnel add u1",
            "probes upsert u1",
            "status u1 enabled",
        ]
    );
    assert_eq!(phase(&e, "u1"), Some(Phase::Enabled));
    let rec = fx.store.records.lock().unwrap()["u1"].clone();
    assert_eq!(rec.netns_path, "/var/run/netns/u1");
    assert_eq!(rec.container_id.as_deref(), Some("c1"));
}

#[tokio::test]
async fn a_nack_leaves_the_pod_pending_until_a_retry_enables_it() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    fx.ztunnel.nack.store(true, SeqCst);
    let err = e.add(request("u1", None)).await.unwrap_err();
    assert!(matches!(err, EnrollError::Ztunnel { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(phase(&e, "u1"), Some(Phase::Pending));
    assert!(e.table.get("u1").unwrap().last_error.is_some());
    assert_eq!(
        fx.log.all()[3..],
        [
            "ztunnel add u1",
            "status u1 pending",
            "event u1 EnrollmentFailed"
        ],
        "no probe entry for a pod ztunnel does not hold"
    );

    fx.log.clear();
    fx.ztunnel.nack.store(false, SeqCst);
    e.announce_if_pending(&id("u1")).await.unwrap();
    assert_eq!(
        fx.log.all(),
        ["ztunnel add u1", "probes upsert u1", "status u1 enabled"]
    );
    assert_eq!(phase(&e, "u1"), Some(Phase::Enabled));
    assert!(e.table.get("u1").unwrap().last_error.is_none());
    // Enabled: the retry has nothing more to do.
    fx.log.clear();
    e.announce_if_pending(&id("u1")).await.unwrap();
    assert!(fx.log.all().is_empty());
}

#[tokio::test]
async fn before_ztunnel_connects_a_pod_is_held_pending() {
    let fx = Fakes::new();
    let e = fx.enroller();
    let err = e.add(request("u1", None)).await.unwrap_err();
    assert!(matches!(err, EnrollError::Ztunnel { .. }), "{err}");
    assert_eq!(phase(&e, "u1"), Some(Phase::Pending));
    assert_eq!(e.ztunnels(), 0);
}

#[tokio::test]
async fn failed_rules_leave_nothing_half_done() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    fx.rules.fail_apply.store(true, SeqCst);
    let err = e.add(request("u1", None)).await.unwrap_err();
    assert!(matches!(err, EnrollError::Rules { .. }), "{err}");
    assert!(
        err.to_string().contains("mesh/pod-u1"),
        "names the pod: {err}"
    );
    assert_eq!(phase(&e, "u1"), None);
    assert_eq!(
        fx.log.all(),
        ["netns /var/run/netns/u1", "rules apply /var/run/netns/u1"]
    );
}

#[tokio::test]
async fn a_bad_netns_is_refused_before_any_rule() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    fx.netns
        .gone
        .lock()
        .unwrap()
        .insert("/var/run/netns/u1".into());
    let err = e.add(request("u1", None)).await.unwrap_err();
    assert!(matches!(err, EnrollError::Netns { .. }), "{err}");
    assert_eq!(fx.log.all(), ["netns /var/run/netns/u1"]);
    assert_eq!(phase(&e, "u1"), None);
}

#[tokio::test]
async fn del_is_keyed_by_the_sandbox() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    e.add(request("u1", Some("c2"))).await.unwrap();
    fx.log.clear();
    // A late DEL of the sandbox this one replaced: ignored.
    assert!(!e.release_sandbox(&id("u1"), "c1").await.unwrap());
    assert!(fx.log.all().is_empty());
    assert_eq!(phase(&e, "u1"), Some(Phase::Enabled));
    // The held sandbox's DEL: released; its netns dies with it, so no rules removal.
    assert!(e.release_sandbox(&id("u1"), "c2").await.unwrap());
    assert_eq!(
        fx.log.all(),
        [
            "probes remove u1",
            "ztunnel del u1",
            "record remove u1",
            "status u1 -"
        ]
    );
    assert_eq!(phase(&e, "u1"), None);
    assert!(
        !e.release_sandbox(&id("u1"), "c2").await.unwrap(),
        "twice is a no-op"
    );
}

#[tokio::test]
async fn a_pod_held_without_a_sandbox_is_released_by_any_del() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    // Enrolled by a relabel or a /proc scan: no container id to compare.
    e.add(request("u1", None)).await.unwrap();
    assert!(e.release_sandbox(&id("u1"), "whatever").await.unwrap());
    assert_eq!(phase(&e, "u1"), None);
}

#[tokio::test]
async fn a_release_whose_rules_removal_fails_keeps_the_pod_held() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    e.add(request("u1", None)).await.unwrap();
    fx.rules.fail_remove.store(true, SeqCst);
    let err = e.remove(&id("u1"), false).await.unwrap_err();
    assert!(matches!(err, EnrollError::Rules { .. }), "{err}");
    assert_eq!(
        phase(&e, "u1"),
        Some(Phase::Enabled),
        "kept, so it is retried"
    );
    fx.rules.fail_remove.store(false, SeqCst);
    fx.log.clear();
    e.remove(&id("u1"), false).await.unwrap();
    assert_eq!(
        fx.log.all(),
        [
            "probes remove u1",
            "rules remove /var/run/netns/u1",
            "ztunnel del u1",
            "record remove u1",
            "status u1 -"
        ]
    );
}

#[tokio::test]
async fn every_phase_of_an_add_is_timed() {
    let fx = Fakes::new();
    let e = fx.enroller_with_ztunnel();
    let mut r = prometheus_client::registry::Registry::default();
    let m = Arc::new(EnrolMetrics::new(&mut r));
    let e2 = Enroller::new(
        e.table.clone(),
        Effects {
            netns: fx.netns.clone(),
            rules: fx.rules.clone(),
            probes: fx.probes.clone(),
            status: fx.status.clone(),
            store: fx.store.clone(),
        },
        m,
    );
    e2.set_ztunnel(fx.ztunnel.clone());
    e2.add(request("u1", None)).await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
    for phase in ["netns", "rules", "record", "ztunnel", "probes", "status"] {
        let line = format!("ambient_cni_add_phase_seconds_count{{phase=\"{phase}\"}} 1");
        assert!(text.contains(&line), "no {line} in\n{text}");
    }
    // The lookup is the controller's (the plugin server's ADD), not the enroller's.
    assert!(text.contains("ambient_cni_add_phase_seconds_count{phase=\"lookup\"} 0"));
}
