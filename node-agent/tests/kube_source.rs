//! The Kubernetes pod source against an in-process fake API server that speaks the real
//! list/watch wire format, driven by the real `kube::Client` and watcher: initial sync,
//! node filtering, changes, resume after a dropped watch, BOOKMARKs, relist after 410,
//! an API server restart, and the direct lookup.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambient_cni_agent::kube_api::pods::KubeSource;
use ambient_cni_agent::pods::source::{PodSource, SourceEvent};
use fake_apiserver::FakeApi;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const NODE: &str = "node-1";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"),
            "labels": {"app": name},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}]},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}]}
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

/// A fake with namespaces `a` (ambient) and `b`, and pods a/p1, b/p3 on this node and
/// a/p2 on another node.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    api.put(
        "namespaces",
        namespace("a", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    api.put("namespaces", namespace("b", json!({})));
    api.put("pods", pod("a", "p1", NODE));
    api.put("pods", pod("a", "p2", "node-2"));
    api.put("pods", pod("b", "p3", NODE));
    api
}

struct Run {
    rx: mpsc::Receiver<SourceEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Run {
    fn start(api: &FakeApi) -> Run {
        let (tx, rx) = mpsc::channel(64);
        let src = Arc::new(KubeSource::new(api.client(), NODE));
        Run {
            rx,
            task: tokio::spawn(src.run(tx)),
        }
    }

    async fn next(&mut self) -> SourceEvent {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("no source event within 10 s")
            .expect("source ended")
    }

    /// Events up to and including `Synced`.
    async fn until_synced(&mut self) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        loop {
            let ev = self.next().await;
            let done = matches!(ev, SourceEvent::Synced);
            out.push(ev);
            if done {
                return out;
            }
        }
    }

    /// Asserts nothing arrives for `d`.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(Some(ev)) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("unexpected event {}", show(&ev));
        }
    }
}

fn show(ev: &SourceEvent) -> String {
    let name = |p: &k8s_openapi::api::core::v1::Pod| {
        format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default()
        )
    };
    match ev {
        SourceEvent::Pod(p) => format!("pod {}", name(p)),
        SourceEvent::PodDeleted(p) => format!("deleted {}", name(p)),
        SourceEvent::Namespace { name, .. } => format!("namespace {name}"),
        SourceEvent::Synced => "synced".into(),
    }
}

fn shown(evs: &[SourceEvent]) -> Vec<String> {
    let mut v: Vec<String> = evs.iter().map(show).collect();
    v.sort();
    v
}

#[tokio::test]
async fn initial_sync_is_this_nodes_pods_and_all_namespaces() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    let evs = run.until_synced().await;
    assert!(matches!(evs.last(), Some(SourceEvent::Synced)));
    assert_eq!(
        shown(&evs),
        [
            "namespace a",
            "namespace b",
            "pod a/p1",
            "pod b/p3",
            "synced"
        ],
        "p2 runs on another node"
    );
    let labels = evs.iter().find_map(|e| match e {
        SourceEvent::Namespace { name, labels } if name == "a" => Some(labels.clone()),
        _ => None,
    });
    assert_eq!(
        labels,
        Some(BTreeMap::from([(
            "istio.io/dataplane-mode".to_owned(),
            "ambient".to_owned()
        )]))
    );
    // The pod list is this node's only, from the watch cache (resourceVersion=0), all namespaces.
    let lists = api.lists(PODS);
    assert_eq!(lists.len(), 1);
    assert_eq!(
        lists[0].param("fieldSelector"),
        Some("spec.nodeName=node-1")
    );
    assert_eq!(lists[0].param("resourceVersion"), Some("0"));
    assert_eq!(lists[0].param("limit"), None);
    assert_eq!(api.lists(NAMESPACES)[0].param("resourceVersion"), Some("0"));
    api.wait_for("both watches", |a| {
        a.live_watches("pods") == 1 && a.live_watches("namespaces") == 1
    })
    .await;
    let w = &api.watches(PODS)[0];
    assert_eq!(w.param("fieldSelector"), Some("spec.nodeName=node-1"));
    assert_eq!(w.param("allowWatchBookmarks"), Some("true"));
    // Kept trimmed: the cache holds every pod of the node.
    let SourceEvent::Pod(p) = evs.iter().find(|e| show(e) == "pod a/p1").unwrap() else {
        unreachable!()
    };
    assert!(p.metadata.managed_fields.is_none());
    // Containers keep only their names (sidecar mode reads them), never images or mounts.
    let containers = &p.spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].name, "c");
    assert!(containers[0].image.is_none(), "{containers:?}");
    assert_eq!(
        p.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.1.0.1")
    );
}

#[tokio::test]
async fn changes_arrive_in_order_and_other_nodes_are_filtered() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    run.until_synced().await;
    api.wait_for("both watches", |a| {
        a.live_watches("pods") == 1 && a.live_watches("namespaces") == 1
    })
    .await;

    api.put("pods", pod("a", "p5", "node-2"));
    let mut p4 = pod("a", "p4", NODE);
    api.put("pods", p4.clone());
    assert_eq!(
        show(&run.next().await),
        "pod a/p4",
        "p5 (other node) is never seen"
    );

    // A status change (the kubelet's PATCH), then an annotation change, then deletion:
    // the deletion carries the last object.
    p4["status"]["podIP"] = json!("10.1.0.4");
    p4["status"]["podIPs"] = json!([{"ip": "10.1.0.4"}]);
    api.put("pods", p4.clone());
    let SourceEvent::Pod(p) = run.next().await else {
        panic!("want a pod update")
    };
    assert_eq!(
        ambient_cni_agent::pods::ips(&p),
        ["10.1.0.4".parse::<std::net::IpAddr>().unwrap()]
    );
    p4["metadata"]["annotations"] = json!({"ambient.istio.io/redirection": "enabled"});
    api.put("pods", p4.clone());
    run.next().await;
    api.delete("pods", "a/p4");
    let SourceEvent::PodDeleted(p) = run.next().await else {
        panic!("want a deletion")
    };
    assert_eq!(p.metadata.name.as_deref(), Some("p4"));
    assert_eq!(
        ambient_cni_agent::pods::annotation(&p, "ambient.istio.io/redirection"),
        Some("enabled")
    );

    // Namespace labels.
    api.put(
        "namespaces",
        namespace("b", json!({"istio.io/dataplane-mode": "ambient"})),
    );
    match run.next().await {
        SourceEvent::Namespace { name, labels } => {
            assert_eq!(name, "b");
            assert_eq!(
                labels.get("istio.io/dataplane-mode").map(String::as_str),
                Some("ambient")
            );
        }
        ev => panic!("want namespace b, got {}", show(&ev)),
    }
    // A namespace deletion needs nothing (its pods leave on their own).
    api.delete("namespaces", "b");
    run.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(api.lists(PODS).len(), 1, "no relist in normal operation");
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_resource_version() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    run.until_synced().await;
    api.wait_for("pod watch", |a| a.live_watches("pods") == 1)
        .await;
    let seen_rv = api.rv();

    api.drop_watches("pods");
    // Changed while the client is reconnecting: the resumed watch replays it.
    let mut p1 = pod("a", "p1", NODE);
    p1["metadata"]["labels"] = json!({"app": "p1", "istio.io/dataplane-mode": "ambient"});
    api.put_quiet("pods", p1);
    let SourceEvent::Pod(p) = run.next().await else {
        panic!("want p1's change")
    };
    assert_eq!(
        ambient_cni_agent::pods::labels(&p)
            .get("istio.io/dataplane-mode")
            .map(String::as_str),
        Some("ambient")
    );
    let watches = api.watches(PODS);
    assert_eq!(watches.len(), 2);
    assert_eq!(
        watches[1].param("resourceVersion"),
        Some(seen_rv.to_string().as_str())
    );
    assert_eq!(
        api.lists(PODS).len(),
        1,
        "a dropped connection is resumed, not relisted"
    );
    run.quiet_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn bookmarks_move_the_resume_point() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    run.until_synced().await;
    api.wait_for("pod watch", |a| a.live_watches("pods") == 1)
        .await;

    // Other nodes' churn moves the resourceVersion; this watch sees none of it but a BOOKMARK.
    for i in 0..5 {
        api.put("pods", pod("a", &format!("other-{i}"), "node-2"));
    }
    api.bookmark("pods");
    let bookmark_rv = api.rv();
    // Let the watcher take the bookmark, then make every older resourceVersion expire.
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.compact("pods");
    api.drop_watches("pods");
    api.put("pods", pod("b", "p6", NODE));
    assert_eq!(show(&run.next().await), "pod b/p6");
    let watches = api.watches(PODS);
    assert_eq!(
        watches.last().unwrap().param("resourceVersion"),
        Some(bookmark_rv.to_string().as_str())
    );
    assert_eq!(
        api.lists(PODS).len(),
        1,
        "resumed from the bookmark, no 410, no relist"
    );
}

#[tokio::test]
async fn gone_410_relists_and_reports_pods_deleted_meanwhile() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    run.until_synced().await;
    api.wait_for("pod watch", |a| a.live_watches("pods") == 1)
        .await;

    // Lost while the watch was broken and the history compacted: p3 deleted, p7 created, p1 changed.
    let last_p3 = api.delete_quiet("pods", "b/p3");
    api.put_quiet("pods", pod("b", "p7", NODE));
    let mut p1 = pod("a", "p1", NODE);
    p1["status"]["phase"] = json!("Succeeded");
    api.put_quiet("pods", p1);
    api.expire("pods");

    let mut evs = Vec::new();
    while evs.len() < 3 {
        evs.push(run.next().await);
    }
    assert_eq!(shown(&evs), ["deleted b/p3", "pod a/p1", "pod b/p7"]);
    // The deletion comes after the relist completed, with the last object known.
    let SourceEvent::PodDeleted(p) = &evs[2] else {
        panic!("deletion last: {:?}", shown(&evs))
    };
    assert_eq!(
        p.metadata.uid.as_deref(),
        last_p3["metadata"]["uid"].as_str()
    );
    let SourceEvent::Pod(p1) = evs.iter().find(|e| show(e) == "pod a/p1").unwrap() else {
        unreachable!()
    };
    assert!(ambient_cni_agent::pods::is_terminal(p1));
    assert_eq!(api.lists(PODS).len(), 2, "410 relists");
    assert_eq!(
        api.lists(NAMESPACES).len(),
        1,
        "the namespace watch is unaffected"
    );
    // No second Synced, and the new watch works.
    api.wait_for("pod watch", |a| a.live_watches("pods") == 1)
        .await;
    api.put("pods", pod("a", "p8", NODE));
    assert_eq!(show(&run.next().await), "pod a/p8");
}

#[tokio::test]
async fn an_api_server_restart_is_survived() {
    let api = cluster().await;
    let mut run = Run::start(&api);
    run.until_synced().await;
    api.wait_for("both watches", |a| {
        a.live_watches("pods") == 1 && a.live_watches("namespaces") == 1
    })
    .await;

    let restart = api.restart(Duration::from_millis(1500));
    tokio::pin!(restart);
    // While it is down: nothing is reported, and changes pile up.
    tokio::select! {
        ev = run.rx.recv() => panic!("event while the API server is down: {:?}", ev.as_ref().map(show)),
        _ = &mut restart => {}
    }
    api.put("pods", pod("b", "p9", NODE));
    api.put("namespaces", namespace("c", json!({"x": "y"})));
    let mut evs = vec![run.next().await, run.next().await];
    evs.sort_by_key(show);
    assert_eq!(shown(&evs), ["namespace c", "pod b/p9"]);
    assert_eq!(api.lists(PODS).len(), 1);
    assert!(api.watches(PODS).len() >= 2);
}

#[tokio::test]
async fn get_reads_the_pod_and_its_namespace_labels() {
    let api = cluster().await;
    let src = KubeSource::new(api.client(), NODE);
    let found = src.get("a", "p1").await.unwrap().expect("p1 exists");
    assert_eq!(found.pod.metadata.name.as_deref(), Some("p1"));
    assert!(
        found.pod.metadata.managed_fields.is_none(),
        "trimmed like watched pods"
    );
    assert_eq!(
        found
            .namespace_labels
            .get("istio.io/dataplane-mode")
            .map(String::as_str),
        Some("ambient")
    );
    assert!(src.get("a", "missing").await.unwrap().is_none());
    let reqs = api.requests();
    assert!(reqs
        .iter()
        .any(|r| r.method == "GET" && r.path == "/api/v1/namespaces/a/pods/p1"));
    assert!(reqs
        .iter()
        .any(|r| r.method == "GET" && r.path == "/api/v1/namespaces/a"));

    // An unreachable API server is an error naming the pod, not "not found".
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = kube::Client::try_from(kube::Config::new(
        format!("http://127.0.0.1:{port}").parse().unwrap(),
    ))
    .unwrap();
    let err = KubeSource::new(dead, NODE)
        .get("a", "p1")
        .await
        .unwrap_err();
    assert!(err.contains("a/p1"), "{err}");
}
