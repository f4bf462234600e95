//! Where pods come from: a source streams pod and namespace objects; the agent keeps the cache.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::mpsc;

/// A change seen by a pod source.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A pod was created or changed.
    Pod(Arc<Pod>),
    /// A pod is gone (the last object seen).
    PodDeleted(Arc<Pod>),
    /// A namespace was created or its labels changed.
    Namespace {
        /// Its name.
        name: String,
        /// Its labels.
        labels: BTreeMap<String, String>,
    },
    /// Everything that existed at start has been delivered.
    Synced,
}

/// A pod found by a direct lookup, with its namespace's labels.
#[derive(Debug, Clone)]
pub struct Found {
    /// The pod.
    pub pod: Arc<Pod>,
    /// Its namespace's labels.
    pub namespace_labels: BTreeMap<String, String>,
}

/// A source of pods on this node (the Kube watcher, or a local directory).
#[tonic::async_trait]
pub trait PodSource: Send + Sync + 'static {
    /// A short name for logs and `status`.
    fn name(&self) -> &'static str;
    /// Streams every object once, then `Synced`, then changes, until the receiver is dropped.
    async fn run(self: Arc<Self>, sink: mpsc::Sender<SourceEvent>);
    /// Looks one pod up directly, bypassing the stream (a plugin ADD that beat the watch).
    async fn get(&self, namespace: &str, name: &str) -> Result<Option<Found>, String>;
}
