//! The Kubernetes status writer against the in-process fake API server, driven by the
//! real `kube::Client`: the exact merge-patch requests on `pods/status`, NotFound
//! handling, and enrolment-failure events.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use ambient_cni_agent::kube_api::status::KubeStatus;
use ambient_cni_agent::mesh::hooks::StatusWriter;
use ambient_cni_agent::pods::PodId;
use fake_apiserver::{FakeApi, Request};
use serde_json::json;

fn id(name: &str) -> PodId {
    PodId {
        namespace: "demo".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

async fn with_pod() -> FakeApi {
    let api = FakeApi::start().await;
    api.put(
        "pods",
        json!({"metadata": {"namespace": "demo", "name": "web", "uid": "uid-web",
            "annotations": {"keep": "me"}},
            "spec": {"nodeName": "node-1", "containers": []}}),
    );
    api
}

fn patches(api: &FakeApi) -> Vec<Request> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect()
}

#[tokio::test]
async fn redirection_annotation_is_merge_patched_on_pods_status() {
    let api = with_pod().await;
    let w = KubeStatus::new(api.client());

    w.set(&id("web"), Some("pending")).await.unwrap();
    w.set(&id("web"), Some("enabled")).await.unwrap();
    let stored = api.get("pods", "demo/web").unwrap();
    assert_eq!(
        stored["metadata"]["annotations"],
        json!({"keep": "me", "ambient.istio.io/redirection": "enabled"})
    );
    w.set(&id("web"), None).await.unwrap();
    let stored = api.get("pods", "demo/web").unwrap();
    assert_eq!(stored["metadata"]["annotations"], json!({"keep": "me"}));

    let p = patches(&api);
    assert_eq!(p.len(), 3);
    for r in &p {
        assert_eq!(r.path, "/api/v1/namespaces/demo/pods/web/status");
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert!(r.query.is_empty(), "no extra parameters: {:?}", r.query);
    }
    let bodies: Vec<String> = p
        .iter()
        .map(|r| r.body.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        bodies,
        [
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"pending"},"uid":"uid-web"}}"#,
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"},"uid":"uid-web"}}"#,
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":null},"uid":"uid-web"}}"#,
        ]
    );
}

#[tokio::test]
async fn removing_from_a_deleted_pod_is_fine_setting_is_not() {
    let api = with_pod().await;
    let w = KubeStatus::new(api.client());
    w.set(&id("gone"), None)
        .await
        .expect("NotFound on removal is ignored");
    let err = w.set(&id("gone"), Some("enabled")).await.unwrap_err();
    assert!(err.contains("demo/gone"), "{err}");
    assert_eq!(patches(&api).len(), 2);
}

/// A late write for a pod that was deleted and re-created under the same name (a
/// StatefulSet pod) carries the old UID: refused, the successor is untouched.
#[tokio::test]
async fn a_late_patch_never_lands_on_a_same_named_successor() {
    let api = with_pod().await;
    let w = KubeStatus::new(api.client());
    let old = PodId {
        uid: "uid-web-before".into(),
        ..id("web")
    };
    let err = w.set(&old, Some("enabled")).await.unwrap_err();
    assert!(
        err.contains("demo/web") && err.contains("another uid"),
        "{err}"
    );
    w.set(&old, None)
        .await
        .expect("removing the mark of a replaced pod is done");
    let stored = api.get("pods", "demo/web").unwrap();
    assert_eq!(stored["metadata"]["annotations"], json!({"keep": "me"}));
    // The pod itself is still written.
    w.set(&id("web"), Some("enabled")).await.unwrap();
    let stored = api.get("pods", "demo/web").unwrap();
    assert_eq!(
        stored["metadata"]["annotations"]["ambient.istio.io/redirection"],
        "enabled"
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let w = KubeStatus::new(kube::Client::try_from(cfg).unwrap());
    assert!(
        w.set(&id("web"), None).await.is_err(),
        "only NotFound is ignored"
    );
}

#[tokio::test]
async fn enrolment_failures_are_recorded_as_pod_events_once() {
    let api = with_pod().await;
    let w = KubeStatus::new(api.client()).with_node("node-1");
    w.event(&id("web"), "EnrollmentFailed", "no ztunnel connection")
        .await
        .unwrap();
    // Retries of the same failure do not write another event.
    w.event(&id("web"), "EnrollmentFailed", "no ztunnel connection")
        .await
        .unwrap();
    w.event(&id("web"), "EnrollmentFailed", "got ack error: boom")
        .await
        .unwrap();

    let posts: Vec<Request> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].path, "/api/v1/namespaces/demo/events");
    let ev = posts[0].body.as_ref().unwrap();
    assert_eq!(ev["apiVersion"], "v1");
    assert_eq!(ev["kind"], "Event");
    assert_eq!(ev["metadata"]["namespace"], "demo");
    assert!(ev["metadata"]["name"].as_str().unwrap().starts_with("web."));
    assert_eq!(
        ev["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": "demo", "name": "web", "uid": "uid-web"})
    );
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "EnrollmentFailed");
    assert_eq!(ev["message"], "no ztunnel connection");
    assert_eq!(
        ev["source"],
        json!({"component": "ambient-cni-agent", "host": "node-1"})
    );
    assert_eq!(ev["count"], 1);
    assert_eq!(
        posts[1].body.as_ref().unwrap()["message"],
        "got ack error: boom"
    );
    assert_ne!(
        posts[0].body.as_ref().unwrap()["metadata"]["name"],
        posts[1].body.as_ref().unwrap()["metadata"]["name"]
    );
}
