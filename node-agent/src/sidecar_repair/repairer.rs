//! The repair controller: watches this node's pods (the agent's pod cache) for sidecar pods
//! broken by the race and acts on each once, as the mode says (Istio's
//! `cni/pkg/repair/repaircontroller.go`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tracing::{debug, info, warn};

use super::broken::{is_broken, is_live, BrokenFilter};
use super::memory::Memory;
use super::metrics::RepairMetrics;
use super::settings::Mode;
use crate::pods::{self, PodId};

/// A pass also runs this often without pod events (retries of failed attempts).
const RESYNC: Duration = Duration::from_secs(10);

/// Event reason of the in-place repair (Normal when done, Warning when it failed).
pub const REASON_REPAIR: &str = "RepairBrokenPod";
/// Istio's event reason of the delete mode.
pub const REASON_DELETE: &str = "DeleteBrokenPod";
/// Istio's event reason of the label mode.
pub const REASON_LABEL: &str = "LabelBrokenPod";

/// What acting on a pod does to the world.
#[tonic::async_trait]
pub trait RepairEffects: Send + Sync {
    /// Finds the running pod's netns and installs its sidecar rules; a summary for the Event.
    async fn redirect(&self, pod: &Pod) -> Result<String, String>;
    /// Deletes the pod (preconditions: its UID and resourceVersion).
    async fn delete(&self, pod: &Pod) -> Result<(), String>;
    /// Sets the label `key=value` on the pod.
    async fn label(&self, pod: &Pod, key: &str, value: &str) -> Result<(), String>;
    /// Records an Event on the pod (failures to record are logged, not returned).
    async fn event(&self, pod: &PodId, warning: bool, reason: &str, message: &str);
}

/// Whether the agent would program this pod (with its namespace's labels) at ADD: the
/// sidecar decision.
pub type IsSidecar = Arc<dyn Fn(&Pod, &Labels) -> bool + Send + Sync>;

/// A namespace's labels.
pub type Labels = BTreeMap<String, String>;

/// The controller.
pub struct Repairer {
    mode: Mode,
    filter: BrokenFilter,
    is_sidecar: IsSidecar,
    effects: Arc<dyn RepairEffects>,
    memory: Mutex<Memory>,
    metrics: Arc<RepairMetrics>,
}

/// What one pass did to one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acted, successfully.
    Success,
    /// Nothing to do for good (e.g. already labelled, not a pod we program).
    Skip(String),
    /// The action failed (retried on a later pass until attempts run out).
    Fail(String),
}

impl Repairer {
    /// A controller acting in `mode` on pods `filter` marks broken.
    pub fn new(
        mode: Mode,
        filter: BrokenFilter,
        is_sidecar: IsSidecar,
        effects: Arc<dyn RepairEffects>,
        metrics: Arc<RepairMetrics>,
    ) -> Self {
        Self {
            mode,
            filter,
            is_sidecar,
            effects,
            memory: Mutex::new(Memory::default()),
            metrics,
        }
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pods of `all` to act on now (live, broken, not dealt with yet), with their
    /// namespace's labels. Forgets the pods that are no longer in `all`.
    pub fn select(
        &self,
        all: &mut dyn Iterator<Item = &Pod>,
        namespaces: &HashMap<String, Labels>,
    ) -> Vec<(Pod, Labels)> {
        // Runs on every cache change, under the cache's lock: borrows, copies only what it picks.
        let mut live = HashSet::new();
        let mut out = Vec::new();
        let mut memory = self.memory();
        for pod in all {
            let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else {
                continue;
            };
            live.insert(uid);
            if is_live(pod) && !memory.is_done(uid) && is_broken(pod, &self.filter) {
                let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                out.push((pod.clone(), namespaces.get(ns).cloned().unwrap_or_default()));
            }
        }
        memory.retain(&live);
        out
    }

    /// Acts on one broken pod (once per UID: a pod already dealt with is skipped).
    pub async fn act(&self, pod: &Pod, ns_labels: &Labels) -> Option<Outcome> {
        let id = pods::pod_id(pod);
        if self.memory().is_done(&id.uid) {
            return None;
        }
        let kind = self.mode.metric_type();
        let outcome = match &self.mode {
            Mode::Repair => self.repair(pod, ns_labels, &id).await,
            Mode::Delete => self.delete(pod, &id).await,
            Mode::Label { key, value } => self.label(pod, &id, key, value).await,
        };
        let mut memory = self.memory();
        match &outcome {
            Outcome::Success => {
                memory.mark_done(&id.uid);
                self.metrics.count(kind, "success");
            }
            Outcome::Skip(why) => {
                debug!(pod = %id, why, "broken sidecar pod not acted on");
                memory.mark_done(&id.uid);
                self.metrics.count(kind, "skip");
            }
            Outcome::Fail(e) => {
                let last = memory.failed(&id.uid);
                warn!(pod = %id, error = %e, given_up = last, "sidecar pod {kind} failed");
                self.metrics.count(kind, "fail");
            }
        }
        Some(outcome)
    }

    async fn repair(&self, pod: &Pod, ns_labels: &Labels, id: &PodId) -> Outcome {
        if !(self.is_sidecar)(pod, ns_labels) {
            return Outcome::Skip("not a sidecar pod this agent programs".into());
        }
        if pods::ips(pod).is_empty() {
            return Outcome::Fail(format!("pod {id} has no IP yet: its netns cannot be found"));
        }
        info!(pod = %id, "sidecar pod failed istio-validation (race with the agent): repairing in place");
        match self.effects.redirect(pod).await {
            Ok(summary) => {
                info!(pod = %id, "sidecar pod repaired");
                let msg = format!(
                    "pod detected as broken (istio-validation failed), repaired in place: {summary}"
                );
                self.effects.event(id, false, REASON_REPAIR, &msg).await;
                Outcome::Success
            }
            Err(e) => {
                let msg = format!("pod detected as broken, but failed to repair: {e}");
                self.effects.event(id, true, REASON_REPAIR, &msg).await;
                Outcome::Fail(e)
            }
        }
    }

    async fn delete(&self, pod: &Pod, id: &PodId) -> Outcome {
        info!(pod = %id, "sidecar pod detected as broken, deleting");
        match self.effects.delete(pod).await {
            Ok(()) => {
                let msg = "pod detected as broken, deleted";
                self.effects.event(id, true, REASON_DELETE, msg).await;
                Outcome::Success
            }
            Err(e) => {
                let msg = format!("pod detected as broken, but failed to delete: {e}");
                self.effects.event(id, true, REASON_DELETE, &msg).await;
                Outcome::Fail(e)
            }
        }
    }

    async fn label(&self, pod: &Pod, id: &PodId, key: &str, value: &str) -> Outcome {
        if pods::labels(pod).contains_key(key) {
            return Outcome::Skip(format!("already has label {key}"));
        }
        info!(pod = %id, "sidecar pod detected as broken, labelling {key}={value}");
        match self.effects.label(pod, key, value).await {
            Ok(()) => {
                let msg = "pod detected as broken, labeled";
                self.effects.event(id, true, REASON_LABEL, msg).await;
                Outcome::Success
            }
            Err(e) => {
                let msg = format!("pod detected as broken, but failed to label: {e}");
                self.effects.event(id, true, REASON_LABEL, &msg).await;
                Outcome::Fail(e)
            }
        }
    }

    /// One pass over `all`: acts on each broken pod not dealt with yet.
    pub async fn pass(
        &self,
        all: &mut dyn Iterator<Item = &Pod>,
        namespaces: &HashMap<String, Labels>,
    ) -> Vec<(PodId, Outcome)> {
        let chosen = self.select(all, namespaces);
        let mut out = Vec::new();
        for (pod, labels) in &chosen {
            if let Some(o) = self.act(pod, labels).await {
                out.push((pods::pod_id(pod), o));
            }
        }
        out
    }

    /// Runs passes over the controller's pod cache on every pod event (and every
    /// [`RESYNC`]) until the process ends.
    pub fn spawn(self: Arc<Self>, ctl: Arc<crate::mesh::controller::Controller>) {
        tokio::spawn(async move {
            info!(
                mode = self.mode.metric_type(),
                "sidecar repair controller started"
            );
            loop {
                // Armed before the pass, so an event during it triggers the next one.
                let notified = ctl.changes().notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let chosen = ctl.with_cache(|pods, namespaces| self.select(pods, namespaces));
                for (pod, labels) in &chosen {
                    let _ = self.act(pod, labels).await;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(RESYNC) => {}
                }
            }
        });
    }
}
