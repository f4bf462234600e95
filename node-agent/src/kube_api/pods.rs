//! The Kubernetes pod source: this node's pods and all namespaces, from the API server.
//!
//! Two `kube::runtime::watcher`s (list, then watch from the list's resourceVersion):
//! pods with `fieldSelector=spec.nodeName=<node>` in all namespaces, and all namespaces
//! (only their labels matter). The watchers resume from the last resourceVersion after a
//! dropped connection or API server restart, with kube's default backoff, and relist
//! after `410 Gone`. A relist replaces the pod set: pods that were known before it but
//! are missing from it were deleted while we could not see them, and leave as
//! [`SourceEvent::PodDeleted`] (see [`PodTracker`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, EnvVar, Namespace, Pod,
    PodSpec, PodStatus, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::chain;
use crate::mesh::sidecar_policy::ISTIO_PROXY;
use crate::pods::source::{Found, PodSource, SourceEvent};

/// How long a direct lookup (the plugin's cache-miss path) may take.
const GET_TIMEOUT: Duration = Duration::from_secs(3);

/// Pods of one node, and all namespaces, from the Kubernetes API.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    node_name: String,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("node_name", &self.node_name)
            .finish()
    }
}

impl KubeSource {
    /// A source of the pods scheduled to `node_name`.
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        Self {
            client,
            node_name: node_name.into(),
        }
    }

    /// The node whose pods this source watches.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    fn pod_watch_config(&self) -> watcher::Config {
        cache_list(watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)))
    }
}

/// Lists served from the API server's watch cache (`resourceVersion=0`, unpaged: the
/// cache ignores limits), as client-go's informers list; a quorum read of one node's pods
/// would scan every pod in etcd, once per node.
fn cache_list(mut cfg: watcher::Config) -> watcher::Config {
    cfg.page_size = None;
    cfg.any_semantic()
}

/// Keeps only what the agent reads of a pod (identity, labels, annotations, node,
/// hostNetwork, service account, phase, IPs; container names, and of `istio-proxy` its
/// args, literal env and run-as ids for sidecar mode): the cache holds every pod of the node.
pub fn trim(pod: Pod) -> Pod {
    let m = pod.metadata;
    let spec = pod.spec.map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        service_account_name: s.service_account_name,
        containers: s.containers.into_iter().map(trim_container).collect(),
        init_containers: s
            .init_containers
            .map(|cs| cs.into_iter().map(trim_container).collect()),
        ..PodSpec::default()
    });
    let status = pod.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        // The sidecar repair reads how init containers ended (name, exit code, reason, message).
        init_container_statuses: s
            .init_container_statuses
            .map(|v| v.into_iter().map(trim_container_status).collect()),
        ..PodStatus::default()
    });
    Pod {
        metadata: ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            labels: m.labels,
            annotations: m.annotations,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        },
        spec,
        status,
    }
}

/// A container's name; for `istio-proxy` also what sidecar mode reads (args, env names with
/// their literal values, runAsUser/runAsGroup).
fn trim_container(c: Container) -> Container {
    if c.name != ISTIO_PROXY {
        return Container {
            name: c.name,
            ..Container::default()
        };
    }
    Container {
        name: c.name,
        args: c.args,
        env: c.env.map(|env| {
            env.into_iter()
                .map(|e| EnvVar {
                    name: e.name,
                    value: e.value,
                    value_from: None,
                })
                .collect()
        }),
        security_context: c.security_context.map(|sc| SecurityContext {
            run_as_user: sc.run_as_user,
            run_as_group: sc.run_as_group,
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// An init container's status down to how it last ended and how it is now, if terminated.
fn trim_container_status(c: ContainerStatus) -> ContainerStatus {
    let terminated = |st: Option<ContainerState>| {
        st.map(|st| ContainerState {
            terminated: st.terminated.map(|t| ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: t.reason,
                message: t.message,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        })
    };
    ContainerStatus {
        name: c.name,
        state: terminated(c.state),
        last_state: terminated(c.last_state),
        ..ContainerStatus::default()
    }
}

fn pod_key(pod: &Pod) -> String {
    match &pod.metadata.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        // A UID is always set by the API server; fall back to the name for odd objects.
        _ => format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        ),
    }
}

/// Turns pod watcher events into source events, remembering the last object of every
/// pod so a relist can report the pods that vanished while the watch was down.
#[derive(Debug, Default)]
pub struct PodTracker {
    known: HashMap<String, Arc<Pod>>,
    /// Keys seen since the current (re)list began; `Some` while listing.
    listing: Option<HashSet<String>>,
    synced: bool,
}

impl PodTracker {
    /// True once the first list has completed.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Number of pods currently known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// True when no pod is known.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The source events for one watcher event (objects already trimmed).
    pub fn on_event(&mut self, ev: Event<Pod>) -> Vec<SourceEvent> {
        match ev {
            Event::Init => {
                self.listing = Some(HashSet::new());
                Vec::new()
            }
            Event::InitApply(pod) => {
                let key = pod_key(&pod);
                if let Some(seen) = self.listing.as_mut() {
                    seen.insert(key.clone());
                }
                self.apply(key, pod)
            }
            Event::Apply(pod) => {
                let key = pod_key(&pod);
                self.apply(key, pod)
            }
            Event::Delete(pod) => {
                self.known.remove(&pod_key(&pod));
                vec![SourceEvent::PodDeleted(Arc::new(pod))]
            }
            Event::InitDone => {
                self.synced = true;
                let Some(seen) = self.listing.take() else {
                    return Vec::new();
                };
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|k| self.known.remove(&k))
                    .map(SourceEvent::PodDeleted)
                    .collect()
            }
        }
    }

    fn apply(&mut self, key: String, pod: Pod) -> Vec<SourceEvent> {
        let pod = Arc::new(pod);
        self.known.insert(key, pod.clone());
        vec![SourceEvent::Pod(pod)]
    }
}

/// Namespace watcher events as source events (labels only; deletions need nothing:
/// the namespace's pods are deleted first and leave on their own).
fn namespace_events(ev: Event<Namespace>) -> Vec<SourceEvent> {
    match ev {
        Event::Apply(ns) | Event::InitApply(ns) => vec![SourceEvent::Namespace {
            name: ns.metadata.name.unwrap_or_default(),
            labels: ns.metadata.labels.unwrap_or_default(),
        }],
        Event::Delete(_) | Event::Init | Event::InitDone => Vec::new(),
    }
}

#[tonic::async_trait]
impl PodSource for KubeSource {
    fn name(&self) -> &'static str {
        "kube"
    }

    async fn run(self: Arc<Self>, sink: mpsc::Sender<SourceEvent>) {
        let pods_api: Api<Pod> = Api::all(self.client.clone());
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        let pods = watcher::watcher(pods_api, self.pod_watch_config())
            .default_backoff()
            .map(|r| r.map(|ev| ev.modify(|p| *p = trim(std::mem::take(p)))));
        let namespaces =
            watcher::watcher(ns_api, cache_list(watcher::Config::default())).default_backoff();
        let mut pods = std::pin::pin!(pods);
        let mut namespaces = std::pin::pin!(namespaces);
        let mut tracker = PodTracker::default();
        let mut ns_synced = false;
        let mut sent_synced = false;
        info!(node = %self.node_name, "watching this node's pods and all namespaces");
        loop {
            let events = tokio::select! {
                Some(r) = pods.next() => match r {
                    Ok(ev) => tracker.on_event(ev),
                    Err(e) => {
                        warn!(error = %chain(&e), "pod watch failed; resuming with backoff");
                        continue;
                    }
                },
                Some(r) = namespaces.next() => match r {
                    Ok(ev) => {
                        if matches!(ev, Event::InitDone) {
                            ns_synced = true;
                        }
                        namespace_events(ev)
                    }
                    Err(e) => {
                        warn!(error = %chain(&e), "namespace watch failed; resuming with backoff");
                        continue;
                    }
                },
                // Both watcher streams are endless; ending means the runtime is going away.
                else => return,
            };
            for ev in events {
                if sink.send(ev).await.is_err() {
                    return;
                }
            }
            if !sent_synced && ns_synced && tracker.synced() {
                sent_synced = true;
                debug!(
                    pods = tracker.len(),
                    "initial pod and namespace lists delivered"
                );
                if sink.send(SourceEvent::Synced).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn get(&self, namespace: &str, name: &str) -> Result<Option<Found>, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let nss: Api<Namespace> = Api::all(self.client.clone());
        let lookup = async {
            let Some(pod) = pods
                .get_opt(name)
                .await
                .map_err(|e| format!("GET pod {namespace}/{name}: {}", chain(&e)))?
            else {
                return Ok(None);
            };
            let ns = nss
                .get_opt(namespace)
                .await
                .map_err(|e| format!("GET namespace {namespace}: {}", chain(&e)))?;
            let namespace_labels: BTreeMap<String, String> =
                ns.and_then(|n| n.metadata.labels).unwrap_or_default();
            Ok(Some(Found {
                pod: Arc::new(trim(pod)),
                namespace_labels,
            }))
        };
        tokio::time::timeout(GET_TIMEOUT, lookup)
            .await
            .map_err(|_| {
                format!("looking up pod {namespace}/{name} took longer than {GET_TIMEOUT:?}")
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, name: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": "7",
                "labels": {"a": "b"}, "annotations": {"x": "y"},
                "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": {"nodeName": "n1", "hostNetwork": true, "serviceAccountName": "sa",
                "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }

    fn names(evs: &[SourceEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                SourceEvent::Pod(p) => format!("pod:{}", p.metadata.name.as_deref().unwrap()),
                SourceEvent::PodDeleted(p) => {
                    format!("del:{}", p.metadata.name.as_deref().unwrap())
                }
                SourceEvent::Namespace { name, .. } => format!("ns:{name}"),
                SourceEvent::Synced => "synced".into(),
            })
            .collect()
    }

    #[test]
    fn trim_keeps_what_the_sidecar_decision_and_repair_read() {
        use crate::mesh::sidecar_policy::{decide, sidecar_inputs, Mode};
        use crate::sidecar_repair::broken::{is_broken, BrokenFilter};
        let full: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web", "uid": "u9",
                "annotations": {"sidecar.istio.io/status": "{}",
                                "traffic.sidecar.istio.io/excludeOutboundPorts": "9000"}},
            "spec": {
                "nodeName": "n1",
                "initContainers": [{"name": "istio-validation", "image": "proxyv2",
                    "args": ["istio-iptables", "--run-validation"],
                    "resources": {"limits": {"cpu": "1"}}}],
                "containers": [
                    {"name": "app", "image": "app", "ports": [{"containerPort": 80}]},
                    {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"],
                     "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                             {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "privileged": false},
                     "volumeMounts": [{"name": "x", "mountPath": "/x"}]}
                ]
            },
            "status": {"phase": "Pending", "podIP": "10.0.0.9",
                "initContainerStatuses": [{"name": "istio-validation", "image": "proxyv2",
                    "imageID": "sha256:1", "ready": false, "restartCount": 2,
                    "containerID": "containerd://abc",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {"terminated": {"exitCode": 126, "reason": "Error",
                        "message": "iptables validation failed", "containerID": "containerd://abc",
                        "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:05Z"}}}]}
        }))
        .unwrap();
        let t = trim(full.clone());
        let policy = crate::mesh::policy::Policy::default();
        let ns = BTreeMap::new();
        assert_eq!(decide(&policy, &t, &ns), Mode::Sidecar);
        assert_eq!(decide(&policy, &t, &ns), decide(&policy, &full, &ns));
        assert_eq!(sidecar_inputs(&t, &[]), sidecar_inputs(&full, &[]));
        let filter = BrokenFilter {
            sidecar_annotation: "sidecar.istio.io/status".into(),
            init_container_name: "istio-validation".into(),
            termination_message: "iptables validation failed".into(),
            exit_code: 126,
        };
        assert!(is_broken(&t, &filter));
        // Only what is read is kept (the cache holds every pod of the node).
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["spec"]["containers"][0], json!({"name": "app"}));
        assert!(v["spec"]["containers"][1].get("volumeMounts").is_none());
        assert_eq!(
            v["status"]["initContainerStatuses"][0]["lastState"],
            json!({"terminated": {"exitCode": 126, "reason": "Error",
                                  "message": "iptables validation failed"}})
        );
    }

    #[test]
    fn trim_keeps_what_the_agent_reads() {
        let t = trim(pod("u1", "p"));
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": "ns", "name": "p", "uid": "u1", "resourceVersion": "7",
                    "labels": {"a": "b"}, "annotations": {"x": "y"}},
                "spec": {"nodeName": "n1", "hostNetwork": true, "serviceAccountName": "sa",
                    "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}
            })
        );
    }

    #[test]
    fn trim_keeps_what_sidecar_mode_reads() {
        use crate::mesh::policy::Policy;
        use crate::mesh::sidecar_policy::{decide, sidecar_inputs, Mode};
        let full: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "p", "uid": "u1",
                "annotations": {"sidecar.istio.io/status": "{}",
                                "traffic.sidecar.istio.io/excludeOutboundPorts": "9000"}},
            "spec": {"nodeName": "n1",
                "initContainers": [{"name": "istio-validation", "image": "proxyv2",
                                    "args": ["istio-iptables", "--run-validation"]}],
                "containers": [
                    {"name": "app", "image": "app", "args": ["--big"], "env": [{"name": "A", "value": "1"}]},
                    {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"],
                     "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                             {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1338, "privileged": false}}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        let t = trim(full.clone());
        let p = Policy::default();
        let ns = BTreeMap::new();
        assert_eq!(decide(&p, &t, &ns), Mode::Sidecar);
        assert_eq!(sidecar_inputs(&t, &[]), sidecar_inputs(&full, &[]));
        let spec = serde_json::to_value(t.spec.unwrap()).unwrap();
        assert_eq!(spec["containers"][0], json!({"name": "app"}));
        assert_eq!(
            spec["initContainers"][0],
            json!({"name": "istio-validation"})
        );
        assert_eq!(
            spec["containers"][1],
            json!({"name": "istio-proxy", "args": ["proxy", "sidecar"],
                   "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}, {"name": "POD_NAME"}],
                   "securityContext": {"runAsUser": 1337, "runAsGroup": 1338}})
        );
    }

    #[test]
    fn first_list_then_watch() {
        let mut t = PodTracker::default();
        assert!(t.on_event(Event::Init).is_empty());
        assert_eq!(
            names(&t.on_event(Event::InitApply(pod("u1", "a")))),
            ["pod:a"]
        );
        assert!(!t.synced());
        assert!(t.on_event(Event::InitDone).is_empty());
        assert!(t.synced());
        assert_eq!(names(&t.on_event(Event::Apply(pod("u2", "b")))), ["pod:b"]);
        assert_eq!(names(&t.on_event(Event::Delete(pod("u1", "a")))), ["del:a"]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn relist_reports_pods_deleted_meanwhile_with_their_last_object() {
        let mut t = PodTracker::default();
        t.on_event(Event::Init);
        t.on_event(Event::InitApply(pod("u1", "a")));
        t.on_event(Event::InitApply(pod("u2", "b")));
        t.on_event(Event::InitDone);
        let mut last = pod("u2", "b");
        last.metadata.resource_version = Some("9".into());
        t.on_event(Event::Apply(last));
        // 410: the watcher relists; `b` was deleted and `c` created while we were away.
        t.on_event(Event::Init);
        assert_eq!(
            names(&t.on_event(Event::InitApply(pod("u1", "a")))),
            ["pod:a"]
        );
        assert_eq!(
            names(&t.on_event(Event::InitApply(pod("u3", "c")))),
            ["pod:c"]
        );
        let done = t.on_event(Event::InitDone);
        assert_eq!(names(&done), ["del:b"]);
        let SourceEvent::PodDeleted(p) = &done[0] else {
            unreachable!()
        };
        assert_eq!(p.metadata.resource_version.as_deref(), Some("9"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_recreated_pod_is_a_new_pod_and_the_old_one_is_deleted() {
        let mut t = PodTracker::default();
        t.on_event(Event::Init);
        t.on_event(Event::InitApply(pod("old", "a")));
        t.on_event(Event::InitDone);
        t.on_event(Event::Init);
        t.on_event(Event::InitApply(pod("new", "a")));
        let done = t.on_event(Event::InitDone);
        let SourceEvent::PodDeleted(p) = &done[0] else {
            panic!("{done:?}")
        };
        assert_eq!(p.metadata.uid.as_deref(), Some("old"));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn namespaces_are_labels_only() {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "n", "labels": {"k": "v"}}}))
                .unwrap();
        let evs = namespace_events(Event::InitApply(ns.clone()));
        let [SourceEvent::Namespace { name, labels }] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert_eq!(name, "n");
        assert_eq!(labels.get("k").map(String::as_str), Some("v"));
        assert!(namespace_events(Event::Delete(ns)).is_empty());
    }

    /// An API server that accepts and never answers: the ADD-path lookup fails within
    /// [`GET_TIMEOUT`] with an error that says so (the plugin then fails closed).
    #[tokio::test]
    async fn a_stalled_api_server_bounds_the_pod_lookup() {
        let (client, hold) = crate::test_support::stalled_api_server_client();
        let source = KubeSource::new(client, "n1");
        let start = std::time::Instant::now();
        let err = match source.get("ns", "web").await {
            Err(e) => e,
            Ok(found) => panic!("a stalled API server answered: {}", found.is_some()),
        };
        assert!(err.contains("took longer than"), "{err}");
        assert!(start.elapsed() < GET_TIMEOUT + Duration::from_secs(2));
        hold.abort();
    }
}
