//! The pod status writer for Kubernetes: the `ambient.istio.io/redirection` annotation
//! (JSON merge patch on `pods/status`, as Istio's agent writes it; istiod keys HBONE on
//! `enabled`) and Warning events on the pod when its enrolment fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

use super::chain;
use crate::mesh::hooks::StatusWriter;
use crate::pods::PodId;

/// The status annotation.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// `source.component` of our events.
pub const EVENT_COMPONENT: &str = "ambient-cni-agent";
/// The same event (pod, reason, message) is not recorded again within this window:
/// a failing pod is retried every few seconds, and each event is an etcd write.
const EVENT_REPEAT_WINDOW: Duration = Duration::from_secs(300);
/// How long one status write may take. The writes sit on the enrolment path: an API
/// server that stalls costs a pod this much, then the failure is logged and enrolment goes on.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on the throttle memory (entries older than the window are pruned first).
const EVENT_MEMORY: usize = 4096;

/// The merge patch that sets (`Some`) or removes (`None`) the redirection annotation
/// of the pod with `uid`. The UID (when known) is a precondition, as the kubelet's
/// status patches carry it: a late write for a deleted pod is refused (409 Conflict)
/// instead of landing on a same-named successor.
pub fn redirection_patch(uid: &str, value: Option<&str>) -> serde_json::Value {
    if uid.is_empty() {
        json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}})
    } else {
        json!({"metadata": {"uid": uid, "annotations": {REDIRECTION_ANNOTATION: value}}})
    }
}

/// Writes pod status through the Kubernetes API.
pub struct KubeStatus {
    client: Client,
    /// `source.host` of events (this node).
    host: Option<String>,
    recent: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl std::fmt::Debug for KubeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStatus")
            .field("host", &self.host)
            .finish()
    }
}

impl KubeStatus {
    /// A writer using `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            host: None,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Names this node as the events' `source.host`.
    pub fn with_node(mut self, node_name: impl Into<String>) -> Self {
        self.host = Some(node_name.into());
        self
    }

    /// True if this (pod, reason, message) was recorded within the window; else remembers it.
    fn repeated(&self, pod: &PodId, reason: &str, message: &str, now: Instant) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let key = (pod.uid.clone(), reason.to_owned());
        if let Some((msg, at)) = recent.get(&key) {
            if msg == message && now.duration_since(*at) < EVENT_REPEAT_WINDOW {
                return true;
            }
        }
        if recent.len() >= EVENT_MEMORY {
            recent.retain(|_, (_, at)| now.duration_since(*at) < EVENT_REPEAT_WINDOW);
            if recent.len() >= EVENT_MEMORY {
                recent.clear();
            }
        }
        recent.insert(key, (message.to_owned(), now));
        false
    }

    /// The core/v1 Warning Event recorded for `pod` (what `kubectl describe pod` lists).
    pub fn event_object(&self, pod: &PodId, reason: &str, message: &str, now: SystemTime) -> Event {
        self.typed_event_object(pod, true, reason, message, now)
    }

    /// The core/v1 Event recorded for `pod`, Warning or Normal.
    pub fn typed_event_object(
        &self,
        pod: &PodId,
        warning: bool,
        reason: &str,
        message: &str,
        now: SystemTime,
    ) -> Event {
        let nanos = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let t = Time(timestamp(now));
        Event {
            metadata: ObjectMeta {
                // client-go's naming: unique per pod and instant.
                name: Some(format!("{}.{nanos:x}", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
                ..ObjectReference::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            count: Some(1),
            first_timestamp: Some(t.clone()),
            last_timestamp: Some(t),
            source: Some(EventSource {
                component: Some(EVENT_COMPONENT.into()),
                host: self.host.clone(),
            }),
            ..Event::default()
        }
    }
}

/// `SystemTime` → the timestamp type k8s-openapi uses.
fn timestamp(now: SystemTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::try_from(now).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

#[tonic::async_trait]
impl StatusWriter for KubeStatus {
    async fn set(&self, pod: &PodId, value: Option<&'static str>) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = Patch::Merge(redirection_patch(&pod.uid, value));
        let patched = tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(&pod.name, &PatchParams::default(), &patch),
        )
        .await
        .map_err(|_| {
            format!(
                "cannot patch {REDIRECTION_ANNOTATION} on pod {pod}: no answer from the API server within {WRITE_TIMEOUT:?}"
            )
        })?;
        match patched {
            Ok(_) => Ok(()),
            // Removing the mark of a pod that is gone (or replaced by a same-named
            // pod, which is not ours to touch) is done.
            Err(kube::Error::Api(s)) if value.is_none() && (s.is_not_found() || s.code == 409) => {
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Err(format!(
                "not marking pod {pod} {REDIRECTION_ANNOTATION}={}: the pod of that name now has another uid ({})",
                value.unwrap_or("(removed)"),
                s.message
            )),
            Err(e) => Err(format!(
                "cannot patch {REDIRECTION_ANNOTATION}={} on pod {pod}: {}",
                value.unwrap_or("(removed)"),
                chain(&e)
            )),
        }
    }

    async fn event(&self, pod: &PodId, reason: &str, message: &str) -> Result<(), String> {
        self.record(pod, true, reason, message).await
    }
}

impl KubeStatus {
    /// Records a Warning or Normal Event on the pod (identical ones throttled).
    pub async fn record(
        &self,
        pod: &PodId,
        warning: bool,
        reason: &str,
        message: &str,
    ) -> Result<(), String> {
        if self.repeated(pod, reason, message, Instant::now()) {
            return Ok(());
        }
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        let ev = self.typed_event_object(pod, warning, reason, message, SystemTime::now());
        tokio::time::timeout(WRITE_TIMEOUT, api.create(&PostParams::default(), &ev))
            .await
            .map_err(|_| {
                format!(
                    "cannot record event {reason} on pod {pod}: no answer from the API server within {WRITE_TIMEOUT:?}"
                )
            })?
            .map(|_| ())
            .map_err(|e| format!("cannot record event {reason} on pod {pod}: {}", chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uid: &str) -> PodId {
        PodId {
            namespace: "ns".into(),
            name: "web".into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn patches_are_istios() {
        assert_eq!(
            redirection_patch("", Some("enabled")).to_string(),
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"}}}"#
        );
        assert_eq!(
            redirection_patch("", None).to_string(),
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":null}}}"#
        );
        assert_eq!(
            redirection_patch("u1", Some("enabled")).to_string(),
            r#"{"metadata":{"annotations":{"ambient.istio.io/redirection":"enabled"},"uid":"u1"}}"#
        );
    }

    fn writer() -> KubeStatus {
        // A client is never used by these tests; any URL will do.
        let cfg = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        KubeStatus::new(Client::try_from(cfg).unwrap()).with_node("node-1")
    }

    #[tokio::test]
    async fn event_object_names_the_pod() {
        let w = writer();
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ev =
            serde_json::to_value(w.event_object(&id("u1"), "EnrollmentFailed", "no ztunnel", at))
                .unwrap();
        assert_eq!(
            ev["metadata"]["name"],
            format!("web.{:x}", 1_700_000_000u128 * 1_000_000_000)
        );
        assert_eq!(ev["metadata"]["namespace"], "ns");
        assert_eq!(
            ev["involvedObject"],
            json!({"apiVersion": "v1", "kind": "Pod", "namespace": "ns", "name": "web", "uid": "u1"})
        );
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["reason"], "EnrollmentFailed");
        assert_eq!(
            ev["source"],
            json!({"component": "ambient-cni-agent", "host": "node-1"})
        );
        assert_eq!(ev["firstTimestamp"], "2023-11-14T22:13:20Z");
    }

    #[tokio::test]
    async fn identical_events_are_throttled() {
        let w = writer();
        let t0 = Instant::now();
        assert!(!w.repeated(&id("u1"), "R", "m", t0));
        assert!(w.repeated(&id("u1"), "R", "m", t0 + Duration::from_secs(10)));
        assert!(!w.repeated(&id("u1"), "R", "other", t0 + Duration::from_secs(11)));
        assert!(!w.repeated(&id("u2"), "R", "other", t0 + Duration::from_secs(11)));
        assert!(!w.repeated(
            &id("u1"),
            "R",
            "other",
            t0 + EVENT_REPEAT_WINDOW + Duration::from_secs(12)
        ));
    }

    /// An API server that accepts connections and never answers: each write fails after
    /// [`WRITE_TIMEOUT`] with an error that says so, instead of holding the pod's ADD.
    #[tokio::test]
    async fn a_stalled_api_server_bounds_each_write() {
        let (client, hold) = crate::test_support::stalled_api_server_client();
        let w = KubeStatus::new(client);
        let start = Instant::now();
        let err = w.set(&id("u1"), Some("enabled")).await.unwrap_err();
        assert!(err.contains("no answer from the API server"), "{err}");
        let err = w.event(&id("u1"), "R", "m").await.unwrap_err();
        assert!(err.contains("no answer from the API server"), "{err}");
        assert!(start.elapsed() < WRITE_TIMEOUT * 2 + Duration::from_secs(2));
        hold.abort();
    }
}
