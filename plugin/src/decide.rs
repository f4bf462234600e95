//! Which pods the plugin passes through locally, without asking the agent.

use crate::conf::NetConf;
use crate::env::PodArgs;

/// Why a pod was passed through locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassThrough {
    /// No `K8S_POD_NAME`/`K8S_POD_NAMESPACE`: not a Kubernetes pod.
    NotAPod,
    /// The namespace is in `exclude_namespaces`.
    ExcludedNamespace,
}

/// `Some(reason)` when the pod needs no agent round trip.
pub fn pass_through(conf: &NetConf, pod: &PodArgs) -> Option<PassThrough> {
    // No exemption for the agent's own pods: they run with hostNetwork, so the runtime
    // never calls CNI for them, and a name-based exemption would be a capture bypass.
    let (Some(ns), Some(_)) = (pod.namespace.as_deref(), pod.name.as_deref()) else {
        return Some(PassThrough::NotAPod);
    };
    if conf.exclude_namespaces.iter().any(|e| e == ns) {
        return Some(PassThrough::ExcludedNamespace);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf() -> NetConf {
        NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","exclude_namespaces":["kube-system","infra"],"agent_namespace":"istio-system","agent_pod_prefix":"ambient-cni-node-"}"#).unwrap()
    }

    fn pod(ns: Option<&str>, name: Option<&str>) -> PodArgs {
        PodArgs {
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let c = conf();
        let cases = [
            (None, None, Some(PassThrough::NotAPod)),
            (Some("shop"), None, Some(PassThrough::NotAPod)),
            (None, Some("web"), Some(PassThrough::NotAPod)),
            (
                Some("kube-system"),
                Some("coredns"),
                Some(PassThrough::ExcludedNamespace),
            ),
            (
                Some("infra"),
                Some("x"),
                Some(PassThrough::ExcludedNamespace),
            ),
            // The agent's pod name is no exemption (an older conf's keys change nothing).
            (Some("istio-system"), Some("ambient-cni-node-abcde"), None),
            (Some("istio-system"), Some("ztunnel-abcde"), None),
            (Some("shop"), Some("ambient-cni-node-abcde"), None),
            (Some("shop"), Some("web-0"), None),
        ];
        for (ns, name, want) in cases {
            assert_eq!(pass_through(&c, &pod(ns, name)), want, "{ns:?}/{name:?}");
        }
    }
}
