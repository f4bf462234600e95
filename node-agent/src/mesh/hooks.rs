//! Side effects of enrolment that depend on the deployment: the host probe set
//! and the pod status annotation. Traits, so the pipeline is the same with the
//! Kube API, a local pod source, or in tests.

use std::net::IpAddr;

use iptables_rules::drift::Finding;

use crate::pods::PodId;

/// The host-netns set of pod IPs whose kubelet probes are SNATed (Istio's `cni/pkg/iptables` host rules).
pub trait ProbeSet: Send + Sync {
    /// Adds or replaces the entries of pod `uid`.
    fn upsert(&self, uid: &str, ips: &[IpAddr]) -> Result<(), String>;
    /// Removes the entries owned by pod `uid` (never another pod's reused IP).
    fn remove(&self, uid: &str) -> Result<(), String>;
    /// After a restart: exactly these pods' entries remain.
    fn resync(&self, held: &[(String, Vec<IpAddr>)]) -> Result<(), String> {
        held.iter().try_for_each(|(uid, ips)| self.upsert(uid, ips))
    }
    /// The drift verifier's readback: which of pod `uid`'s IPs are not in the set as its own.
    fn check(&self, _uid: &str, _ips: &[IpAddr]) -> Result<Vec<Finding>, String> {
        Ok(Vec::new())
    }
    /// Uninstall: removes the host rule and the whole set (nothing when none was installed).
    fn uninstall(&self) -> Result<(), String> {
        Ok(())
    }
}

/// No probe set (a host without kubelet probes, e.g. the local demo).
#[derive(Debug, Default)]
pub struct NoProbeSet;

impl ProbeSet for NoProbeSet {
    fn upsert(&self, _: &str, _: &[IpAddr]) -> Result<(), String> {
        Ok(())
    }
    fn remove(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

/// Publishes `ambient.istio.io/redirection` on the pod (`None` removes it).
#[tonic::async_trait]
pub trait StatusWriter: Send + Sync {
    /// Sets or clears the annotation.
    async fn set(&self, pod: &PodId, value: Option<&'static str>) -> Result<(), String>;
    /// Records a Kubernetes Event on the pod (enrolment failures).
    async fn event(&self, pod: &PodId, reason: &str, message: &str) -> Result<(), String>;
}

/// No status publishing (local pod source).
#[derive(Debug, Default)]
pub struct NoStatus;

#[tonic::async_trait]
impl StatusWriter for NoStatus {
    async fn set(&self, _: &PodId, _: Option<&'static str>) -> Result<(), String> {
        Ok(())
    }
    async fn event(&self, _: &PodId, _: &str, _: &str) -> Result<(), String> {
        Ok(())
    }
}
