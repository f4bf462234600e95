//! The repair controller's effects on a real node: the running pod's netns found as ambient
//! pods are found after a restart (the `/proc` scan), its sidecar rules installed with the
//! agent's backend, and the Kubernetes writes of the delete and label modes and the Events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use iptables_rules::netns::{Netns, NsId};
use iptables_rules::sidecar::{Applied, SidecarConfig, SidecarRedirector};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::Client;
use serde_json::json;
use tracing::warn;

use super::repairer::RepairEffects;
use crate::kube_api::chain;
use crate::kube_api::status::{KubeStatus, WRITE_TIMEOUT};
use crate::mesh::sidecar_policy::sidecar_inputs;
use crate::pods::{self, PodId};

/// Finds a running pod's netns from its UID and IPs.
pub type FindNetns = Arc<dyn Fn(&str, &[IpAddr]) -> Result<Netns, String> + Send + Sync>;

/// The production finder: the `/proc` scan of `host_proc` (cgroup → pod UID, proven by the IP).
pub fn proc_scan(host_proc: PathBuf, host: NsId) -> FindNetns {
    Arc::new(move |uid: &str, ips: &[IpAddr]| {
        let wanted: HashMap<String, Vec<IpAddr>> = [(uid.to_string(), ips.to_vec())].into();
        crate::discovery::scan_for_pods(&host_proc, &wanted, host)
            .remove(uid)
            .ok_or_else(|| {
                format!(
                    "no netns holding {ips:?} found for pod uid {uid} under {}",
                    host_proc.display()
                )
            })
    })
}

/// Installs a running pod's sidecar rules (blocking: enters the netns).
pub fn redirect_running_pod(
    find: &FindNetns,
    rules: &SidecarRedirector,
    pod: &Pod,
) -> Result<String, String> {
    let id = pods::pod_id(pod);
    let inputs = sidecar_inputs(pod, &[]);
    // Parameters first: a pod with a bad annotation is refused before its netns is touched.
    let cfg = SidecarConfig::from_inputs(&inputs).map_err(|e| e.to_string())?;
    let ns = find(&id.uid, &inputs.pod_ips)?;
    let applied = rules
        .apply(&ns, &cfg)
        .map_err(|e| format!("pod {id}: netns {}: {e}", ns.label()))?;
    let how = match applied {
        Applied::Installed => "installed",
        Applied::AlreadyPresent => "already present",
    };
    Ok(format!("{} ({how}, {})", cfg.summary(), rules.kind()))
}

/// Effects through the host and the Kubernetes API (`client` `None`: a local pod source,
/// where only the in-place repair works and Events are logged).
pub struct NodeEffects {
    /// The netns finder.
    pub find: FindNetns,
    /// The sidecar rules backend.
    pub rules: SidecarRedirector,
    /// The API client of the delete and label modes.
    pub client: Option<Client>,
    /// The Event writer.
    pub events: Option<Arc<KubeStatus>>,
}

#[tonic::async_trait]
impl RepairEffects for NodeEffects {
    async fn redirect(&self, pod: &Pod) -> Result<String, String> {
        let (find, rules, pod) = (self.find.clone(), self.rules, pod.clone());
        tokio::task::spawn_blocking(move || redirect_running_pod(&find, &rules, &pod))
            .await
            .map_err(|e| format!("repair task: {e}"))?
    }

    async fn delete(&self, pod: &Pod) -> Result<(), String> {
        let id = pods::pod_id(pod);
        let client = self
            .client
            .clone()
            .ok_or("no Kubernetes API (local pod source)")?;
        let api: Api<Pod> = Api::namespaced(client, &id.namespace);
        // Make sure we delete what we think we are deleting (Istio's preconditions).
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(id.uid.clone()),
                resource_version: pod.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        tokio::time::timeout(WRITE_TIMEOUT, api.delete(&id.name, &dp))
            .await
            .map_err(|_| format!("cannot delete pod {id}: no answer from the API server"))?
            .map(|_| ())
            .map_err(|e| format!("cannot delete pod {id}: {}", chain(&e)))
    }

    async fn label(&self, pod: &Pod, key: &str, value: &str) -> Result<(), String> {
        let id = pods::pod_id(pod);
        let client = self
            .client
            .clone()
            .ok_or("no Kubernetes API (local pod source)")?;
        let api: Api<Pod> = Api::namespaced(client, &id.namespace);
        // pods/status can set labels too and is the lower privilege (Istio's choice).
        let patch = Patch::Merge(json!({"metadata": {"uid": id.uid, "labels": {key: value}}}));
        tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(&id.name, &PatchParams::default(), &patch),
        )
        .await
        .map_err(|_| format!("cannot label pod {id}: no answer from the API server"))?
        .map(|_| ())
        .map_err(|e| format!("cannot label pod {id} {key}={value}: {}", chain(&e)))
    }

    async fn event(&self, pod: &PodId, warning: bool, reason: &str, message: &str) {
        if let Some(w) = &self.events {
            if let Err(e) = w.record(pod, warning, reason, message).await {
                warn!(pod = %pod, error = %e, "cannot record repair event");
            }
        }
    }
}
