//! What the agent hands to each new ztunnel connection: its current pods.

use std::sync::Arc;

use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::netns::Netns;

/// One enrolled pod as the snapshot sees it.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// The Kubernetes pod UID.
    pub uid: String,
    /// Name, namespace and service account (ztunnel matches its xDS workload by these).
    pub info: WorkloadInfo,
    /// The pod's netns when known: sent as `AddWorkload` + fd, else `KeepWorkload`.
    pub netns: Option<Arc<Netns>>,
}

/// Source of the snapshot sent to every new ztunnel connection.
///
/// Called once per connection, after the connection is registered for
/// steady-state adds; so callers must update this state *before* calling
/// `add_workload` (and remove from it before `del_workload`) for no pod to
/// fall between a snapshot and the adds that follow it.
pub trait SnapshotSource: Send + Sync {
    /// The pods to announce, in the order to send them.
    fn snapshot(&self) -> Vec<SnapshotEntry>;
}

impl<F> SnapshotSource for F
where
    F: Fn() -> Vec<SnapshotEntry> + Send + Sync,
{
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self()
    }
}
