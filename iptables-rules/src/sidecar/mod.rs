//! Istio's sidecar-mode redirection: the rules `istio-init` would install, programmed
//! inside an injected pod's netns at ADD (istio-cni's sidecar mode).
//!
//! The agent reads a pod into [`SidecarInputs`] (pure data, no Kubernetes types here);
//! [`SidecarConfig::from_inputs`] applies Istio's names, defaults and validation;
//! [`SidecarRedirector`] installs the rules with either backend.
//!
//! Interface agreed between the rules lane and the agent lane (stop 16); bodies follow.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::backend::BackendKind;
use crate::error::RulesError;
use crate::netns::Netns;

/// What the agent reads off a sidecar pod for its redirection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarInputs {
    /// `namespace/name`, for errors.
    pub pod: String,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The `istio-proxy` container's literal env values (`ISTIO_META_DNS_CAPTURE`, ...).
    pub proxy_env: BTreeMap<String, String>,
    /// `istio-proxy` `securityContext.runAsUser` (1337 when unset or 0).
    pub proxy_uid: Option<i64>,
    /// `istio-proxy` `securityContext.runAsGroup` (1337 when unset or 0).
    pub proxy_gid: Option<i64>,
    /// The pod's addresses in prevResult order (the IPv6 decision reads them).
    pub pod_ips: Vec<IpAddr>,
}

/// An annotation or env value Istio would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: {key}={value:?}: {reason}")]
pub struct ParamError {
    /// `namespace/name`.
    pub pod: String,
    /// The annotation or env name.
    pub key: String,
    /// The value given.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

/// A validated sidecar redirection (Istio's `Redirect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    pod: String,
}

impl SidecarConfig {
    /// Istio's defaults and validation applied to one pod's inputs.
    pub fn from_inputs(inputs: &SidecarInputs) -> Result<Self, ParamError> {
        Ok(Self {
            pod: inputs.pod.clone(),
        })
    }

    /// One line for logs and Events (mode, owner, ranges, ports).
    pub fn summary(&self) -> String {
        format!("sidecar redirection for {}", self.pod)
    }
}

/// What [`SidecarRedirector::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The rules were installed (atomically).
    Installed,
    /// Exactly these rules were already there (re-ADD); nothing was written.
    AlreadyPresent,
}

/// Installs sidecar rules with one backend.
#[derive(Debug, Clone, Copy)]
pub struct SidecarRedirector {
    kind: BackendKind,
}

impl SidecarRedirector {
    /// A redirector for `kind`.
    pub fn new(kind: BackendKind) -> Self {
        Self { kind }
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Installs `cfg` in `ns` all or nothing; a no-op when exactly these rules are there.
    pub fn apply(&self, ns: &Netns, cfg: &SidecarConfig) -> Result<Applied, RulesError> {
        let _ = (ns, cfg);
        Err(RulesError::Config(
            "sidecar redirection is not implemented yet".into(),
        ))
    }

    /// True when exactly `cfg`'s rules (and route, for TPROXY) are installed in `ns`.
    pub fn matches(&self, ns: &Netns, cfg: &SidecarConfig) -> Result<bool, RulesError> {
        let _ = (ns, cfg);
        Ok(false)
    }
}
