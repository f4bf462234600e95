//! Which of three things the agent does for a pod at ADD (ambient capture, Istio's sidecar
//! redirection, or nothing), and what a sidecar pod's redirection is read from: pure
//! functions of the pod, its namespace's labels and the agent's settings. The sidecar
//! checks are istio-cni's (`cni/pkg/plugin/plugin.go`, `kubernetes.go`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use iptables_rules::sidecar::SidecarInputs;
use k8s_openapi::api::core::v1::{Container, Pod};

use super::policy::{parse_bool, Policy, Skip};
use crate::pods;

/// The container Istio's injector adds (a regular container, or a native sidecar init container).
pub const ISTIO_PROXY: &str = "istio-proxy";
/// The init container that programs the rules itself (injector without CNI): nothing for us to do.
pub const ISTIO_INIT: &str = "istio-init";
/// Per-pod injection switch (label, or the older annotation; the label wins).
pub const SIDECAR_INJECT: &str = "sidecar.istio.io/inject";
/// An istio-proxy env value that turns the proxy off.
pub const DISABLE_ENVOY: &str = "DISABLE_ENVOY";

/// What the agent does for a pod at ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ambient capture (rules, ztunnel).
    Ambient,
    /// Istio's sidecar redirection, programmed at ADD.
    Sidecar,
    /// Nothing.
    PassThrough(Why),
}

/// Why a pod gets nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Not ambient (why), and no sidecar to serve.
    NotAmbient(Skip),
    /// Sidecar-injected, but sidecar mode is off in this agent.
    SidecarModeOff,
    /// Sidecar-injected, but `sidecar.istio.io/inject` is false.
    InjectDisabled,
    /// An `istio-init` container programs the rules itself.
    IstioInit,
    /// No `istio-proxy` container.
    NoProxy,
    /// The proxy is a gateway (`proxy router`), not a sidecar.
    Gateway,
    /// `DISABLE_ENVOY` is true on the proxy.
    EnvoyDisabled,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotAmbient(skip) => skip.fmt(f),
            Self::SidecarModeOff => f.write_str("sidecar-injected pod, sidecar mode is off"),
            Self::InjectDisabled => f.write_str("sidecar injection disabled on the pod"),
            Self::IstioInit => f.write_str("istio-init container installs the rules itself"),
            Self::NoProxy => f.write_str("no istio-proxy container"),
            Self::Gateway => f.write_str("istio-proxy runs a gateway, not a sidecar"),
            Self::EnvoyDisabled => f.write_str("DISABLE_ENVOY is set on istio-proxy"),
        }
    }
}

/// The pod's mode: hostNetwork and excluded namespaces get nothing, then ambient as
/// [`Policy::evaluate`] says (it never takes a pod with `sidecar.istio.io/status`), then
/// the sidecar checks when sidecar mode is on.
pub fn decide(policy: &Policy, pod: &Pod, ns_labels: &BTreeMap<String, String>) -> Mode {
    // Before the ambient verdict, which looks at the sidecar annotation first: Istio skips
    // an excluded namespace's pods whatever they are.
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let early = if pods::host_network(pod) {
        Some(Skip::HostNetwork)
    } else if policy.exclude_namespaces.iter().any(|n| n == namespace) {
        Some(Skip::ExcludedNamespace)
    } else if pods::is_terminal(pod) {
        Some(Skip::Terminal)
    } else {
        None
    };
    if let Some(skip) = early {
        return Mode::PassThrough(Why::NotAmbient(skip));
    }
    let skip = match policy.evaluate(pod, ns_labels) {
        Ok(()) => return Mode::Ambient,
        Err(skip) => skip,
    };
    match skip {
        // The sidecar checks only run for an injected pod in a namespace we serve.
        Skip::Sidecar if policy.sidecar_mode => match sidecar_check(pod) {
            Ok(()) => Mode::Sidecar,
            Err(why) => Mode::PassThrough(why),
        },
        Skip::Sidecar => Mode::PassThrough(Why::SidecarModeOff),
        other => Mode::PassThrough(Why::NotAmbient(other)),
    }
}

/// Istio's checks for a pod carrying `sidecar.istio.io/status` (the caller knows it
/// does), in Istio's order.
fn sidecar_check(pod: &Pod) -> Result<(), Why> {
    if containers(pod).any(|c| c.name == ISTIO_INIT) {
        return Err(Why::IstioInit);
    }
    let proxy = proxy_container(pod);
    let env_true = |name: &str| {
        proxy
            .and_then(|c| c.env.as_ref())
            .and_then(|env| env.iter().rev().find(|e| e.name == name))
            .and_then(|e| e.value.as_deref())
            .and_then(parse_bool)
            == Some(true)
    };
    if env_true(DISABLE_ENVOY) {
        return Err(Why::EnvoyDisabled);
    }
    let Some(proxy) = proxy else {
        return Err(Why::NoProxy);
    };
    // `proxy <type>`: anything but `sidecar` (e.g. `router`) is a gateway.
    if let Some([first, kind, ..]) = proxy.args.as_deref() {
        if first == "proxy" && !kind.is_empty() && kind != "sidecar" {
            return Err(Why::Gateway);
        }
    }
    let labels = pods::labels(pod);
    let inject = labels
        .get(SIDECAR_INJECT)
        .map(String::as_str)
        .or_else(|| pods::annotation(pod, SIDECAR_INJECT));
    // Istio ignores a value that is not a boolean.
    if inject.and_then(parse_bool) == Some(false) {
        return Err(Why::InjectDisabled);
    }
    Ok(())
}

/// Init containers then containers (a native sidecar `istio-proxy` is an init container).
fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default()
        .iter()
        .chain(spec.map(|s| s.containers.as_slice()).unwrap_or_default())
}

/// The last `istio-proxy` container, as Istio's loop leaves it.
fn proxy_container(pod: &Pod) -> Option<&Container> {
    containers(pod).filter(|c| c.name == ISTIO_PROXY).last()
}

/// What the sidecar rules are built from: the pod's annotations, the istio-proxy
/// container's env (Istio's reading: a `valueFrom` entry counts with an empty value)
/// and run-as ids, and its addresses (`prevResult`'s when given, else the pod status).
pub fn sidecar_inputs(pod: &Pod, prev_result_ips: &[IpAddr]) -> SidecarInputs {
    let id = pods::pod_id(pod);
    let proxy = proxy_container(pod);
    let proxy_env = proxy
        .and_then(|c| c.env.as_ref())
        .into_iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    let sc = proxy.and_then(|c| c.security_context.as_ref());
    SidecarInputs {
        pod: format!("{}/{}", id.namespace, id.name),
        annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        proxy_env,
        proxy_uid: sc.and_then(|s| s.run_as_user),
        proxy_gid: sc.and_then(|s| s.run_as_group),
        pod_ips: if prev_result_ips.is_empty() {
            pods::ips(pod)
        } else {
            prev_result_ips.to_vec()
        },
    }
}

#[cfg(test)]
#[path = "sidecar_policy_tests.rs"]
mod tests;
