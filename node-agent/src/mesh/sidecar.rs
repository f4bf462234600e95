//! A sidecar-injected pod's ADD: Istio's sidecar redirection validated from the pod, then
//! installed synchronously in its netns (what istio-cni does in the plugin). Not an
//! ambient pod: not held, no ztunnel, nothing to undo at DEL (the rules die with the netns).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use iptables_rules::backend::BackendKind;
use iptables_rules::sidecar::{Applied, ParamError, SidecarConfig, SidecarRedirector};
use k8s_openapi::api::core::v1::Pod;
use tracing::{info, warn};

use super::hooks::StatusWriter;
use super::netns::NetnsFinder;
use super::sidecar_metrics::{result, SidecarMetrics};
use super::sidecar_policy::sidecar_inputs;
use crate::pods;

/// The Event reason posted on a pod whose sidecar annotations (or proxy env) are refused.
pub const EVENT_REASON: &str = "SidecarRedirectionInvalid";

/// Why a sidecar pod's ADD failed.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// An annotation or proxy env value Istio would refuse; nothing was written.
    #[error("sidecar redirection refused: {0}")]
    Invalid(ParamError),
    /// The runtime's netns path could not be opened.
    #[error("sidecar pod {pod}: netns {path}: {error}")]
    Netns {
        /// `namespace/name`.
        pod: String,
        /// `CNI_NETNS`.
        path: String,
        /// Why.
        error: String,
    },
    /// The rules could not be installed (the backend installs all or nothing).
    #[error("sidecar pod {pod}: installing the sidecar redirection in {path}: {error}")]
    Rules {
        /// `namespace/name`.
        pod: String,
        /// `CNI_NETNS`.
        path: String,
        /// Why.
        error: String,
    },
}

/// Programs sidecar pods at ADD with the agent's rules backend.
pub struct SidecarPath {
    redirector: SidecarRedirector,
    netns: Arc<dyn NetnsFinder>,
    status: Arc<dyn StatusWriter>,
    metrics: Arc<SidecarMetrics>,
}

impl SidecarPath {
    /// A sidecar path installing with `kind`, opening netns with `netns`, posting Events with `status`.
    pub fn new(
        kind: BackendKind,
        netns: Arc<dyn NetnsFinder>,
        status: Arc<dyn StatusWriter>,
        metrics: Arc<SidecarMetrics>,
    ) -> Self {
        Self {
            redirector: SidecarRedirector::new(kind),
            netns,
            status,
            metrics,
        }
    }

    /// Validates the pod's redirection and installs it in the netns at `netns_path`
    /// (`ips`: prevResult's addresses); a re-ADD finding the same rules writes nothing.
    pub async fn add(
        &self,
        pod: &Pod,
        netns_path: &str,
        ips: &[IpAddr],
    ) -> Result<Applied, SidecarError> {
        let started = Instant::now();
        let res = self.program(pod, netns_path, ips).await;
        let label = match &res {
            Ok(Applied::Installed) => result::PROGRAMMED,
            Ok(Applied::AlreadyPresent) => result::UNCHANGED,
            Err(SidecarError::Invalid(_)) => result::INVALID,
            Err(_) => result::FAILED,
        };
        self.metrics.add(label, started.elapsed());
        let id = pods::pod_id(pod);
        match &res {
            Ok(applied) => info!(pod = %id, result = label, ?applied, "sidecar redirection"),
            Err(e @ SidecarError::Invalid(_)) => {
                warn!(pod = %id, error = %e, "sidecar pod refused");
                // The ADD answers now; the Event may wait on the API server.
                let (status, msg) = (self.status.clone(), e.to_string());
                tokio::spawn(async move {
                    if let Err(err) = status.event(&id, EVENT_REASON, &msg).await {
                        warn!(pod = %id, error = %err, "cannot post the sidecar Event");
                    }
                });
            }
            Err(e) => warn!(pod = %id, error = %e, "sidecar redirection failed"),
        }
        res
    }

    async fn program(
        &self,
        pod: &Pod,
        netns_path: &str,
        ips: &[IpAddr],
    ) -> Result<Applied, SidecarError> {
        let inputs = sidecar_inputs(pod, ips);
        // Validated before the netns is touched: a refused pod gets nothing.
        let cfg = SidecarConfig::from_inputs(&inputs).map_err(SidecarError::Invalid)?;
        let (finder, redirector) = (self.netns.clone(), self.redirector);
        let (name, path) = (inputs.pod.clone(), netns_path.to_owned());
        tokio::task::spawn_blocking(move || {
            let ns = finder
                .open(&PathBuf::from(&path))
                .map_err(|e| SidecarError::Netns {
                    pod: name.clone(),
                    path: path.clone(),
                    error: e.to_string(),
                })?;
            redirector
                .apply(&ns, &cfg)
                .map_err(|e| SidecarError::Rules {
                    pod: name,
                    path,
                    error: e.to_string(),
                })
        })
        .await
        .map_err(|e| SidecarError::Rules {
            pod: inputs.pod,
            path: netns_path.to_owned(),
            error: format!("worker failed: {e}"),
        })?
    }
}
