//! Race repair for sidecar pods (Istio's `cni/pkg/repair`): a pod that started before the
//! agent could program it fails its `istio-validation` init container with exit code 126;
//! the agent finds it among this node's pods and, by default, installs its sidecar rules
//! into the running pod's netns (or deletes or labels it, as Istio's settings say).

pub mod broken;
pub mod effects;
pub mod memory;
pub mod metrics;
pub mod repairer;
pub mod settings;
