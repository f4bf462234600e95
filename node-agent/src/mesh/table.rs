//! The pods the agent holds, their state, and the ZDS snapshot built from them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::config::InpodConfig;
use iptables_rules::netns::Netns;

use crate::inpod::zds::snapshot::{SnapshotEntry, SnapshotSource};
use crate::pods::PodId;
use crate::verify::outcome::Verified;

/// Where a held pod stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Rules installed, no ztunnel has acked it yet (its TCP goes nowhere until one does).
    Pending,
    /// Rules installed and ztunnel acked.
    Enabled,
}

impl Phase {
    /// The `ambient.istio.io/redirection` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Enabled => "enabled",
        }
    }
}

/// One held pod.
#[derive(Debug, Clone)]
pub struct Held {
    /// Identity.
    pub id: PodId,
    /// `spec.serviceAccountName` (ztunnel matches on it).
    pub service_account: String,
    /// Its netns, when known (else ztunnel is told to keep what it has).
    pub netns: Option<Arc<Netns>>,
    /// The netns path it was opened from.
    pub netns_path: Option<String>,
    /// The rules options it got.
    pub cfg: InpodConfig,
    /// Its IPs (probe set entries).
    pub ips: Vec<IpAddr>,
    /// The sandbox's container id, when it came from a CNI ADD (for GC).
    pub container_id: Option<String>,
    /// Pending or enabled.
    pub phase: Phase,
    /// The last error of its enrolment, if any.
    pub last_error: Option<String>,
    /// When the phase last changed.
    pub since: SystemTime,
}

impl Held {
    /// The ZDS workload info.
    pub fn workload_info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.id.name.clone(),
            namespace: self.id.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }
}

/// The table of held pods, keyed by UID.
#[derive(Debug, Default)]
pub struct Table {
    pods: Mutex<BTreeMap<String, Held>>,
    /// The drift verifier's last result per held pod, for `doctor`.
    verified: Mutex<BTreeMap<String, Verified>>,
    /// Wakes the one follower of the held set (the drift notification watches).
    changed: tokio::sync::Notify,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Held>> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or replaces a pod.
    pub fn put(&self, held: Held) {
        self.lock().insert(held.id.uid.clone(), held);
        self.changed.notify_one();
    }

    /// Resolves after the next change to the held pods (put, take or update; a change made
    /// since the last call counts). For one follower only.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// One pod.
    pub fn get(&self, uid: &str) -> Option<Held> {
        self.lock().get(uid).cloned()
    }

    /// Finds a pod by namespace/name.
    pub fn find(&self, namespace: &str, name: &str) -> Option<Held> {
        self.lock()
            .values()
            .find(|h| h.id.namespace == namespace && h.id.name == name)
            .cloned()
    }

    /// Removes a pod, returning it.
    pub fn take(&self, uid: &str) -> Option<Held> {
        self.verified_map().remove(uid);
        let held = self.lock().remove(uid);
        self.changed.notify_one();
        held
    }

    fn verified_map(&self) -> MutexGuard<'_, BTreeMap<String, Verified>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the drift verifier's result for a held pod (ignored if no longer held).
    pub fn set_verified(&self, uid: &str, v: Verified) {
        if self.lock().contains_key(uid) {
            self.verified_map().insert(uid.to_owned(), v);
        }
    }

    /// The drift verifier's last result for a pod.
    pub fn verified(&self, uid: &str) -> Option<Verified> {
        self.verified_map().get(uid).cloned()
    }

    /// UIDs of every held pod, sorted.
    pub fn uids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Updates a pod in place if held.
    pub fn update(&self, uid: &str, f: impl FnOnce(&mut Held)) {
        if let Some(h) = self.lock().get_mut(uid) {
            f(h);
            self.changed.notify_one();
        }
    }

    /// Every held pod.
    pub fn all(&self) -> Vec<Held> {
        self.lock().values().cloned().collect()
    }

    /// Calls `f` with every held pod under the table's lock, copying nothing (for passes that
    /// run on every change: a copy of the table each time costs O(pods) allocations per ADD).
    /// `f` must not block.
    pub fn for_each(&self, mut f: impl FnMut(&Held)) {
        for h in self.lock().values() {
            f(h);
        }
    }

    /// Number of held pods in each phase: (pending, enabled).
    pub fn counts(&self) -> (usize, usize) {
        let pods = self.lock();
        let pending = pods.values().filter(|h| h.phase == Phase::Pending).count();
        (pending, pods.len() - pending)
    }
}

impl SnapshotSource for Table {
    fn snapshot(&self) -> Vec<SnapshotEntry> {
        self.lock()
            .values()
            .map(|h| SnapshotEntry {
                uid: h.id.uid.clone(),
                info: h.workload_info(),
                netns: h.netns.clone(),
            })
            .collect()
    }
}
