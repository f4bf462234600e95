//! Whether a pod belongs in the mesh, and with which in-pod options: pure
//! functions of the pod, its namespace's labels and the agent's settings
//! (Istio-compatible, as Istio's `cni/pkg/nodeagent` reads `AMBIENT_ENABLEMENT_SELECTOR`).

use std::collections::BTreeMap;

use iptables_rules::config::InpodConfig;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::Deserialize;

use crate::pods;

/// The intent label, on namespaces and pods.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// A sidecar-injected pod carries this annotation and is never ambient.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Per-pod override: do not redirect inbound.
pub const BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";
/// Per-pod override: DNS capture on/off.
pub const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
/// Per-pod override: interfaces whose inbound is treated as outbound.
pub const VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// Istio chart's `ambient.enablementSelectors` default, used when none is configured.
pub const DEFAULT_SELECTORS: &str = r#"
- podSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
- podSelector:
    matchExpressions:
    - {key: istio.io/dataplane-mode, operator: NotIn, values: [none]}
  namespaceSelector:
    matchLabels: {istio.io/dataplane-mode: ambient}
"#;

/// One enablement selector pair (an omitted selector selects everything).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnablementSelector {
    /// Selects pods by their labels.
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    /// Selects pods by their namespace's labels.
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
}

/// Parses `AMBIENT_ENABLEMENT_SELECTOR` (YAML or JSON list); empty text means Istio's default.
pub fn parse_selectors(text: &str) -> Result<Vec<EnablementSelector>, String> {
    let text = if text.trim().is_empty() {
        DEFAULT_SELECTORS
    } else {
        text
    };
    let sels: Vec<EnablementSelector> =
        serde_yaml_ng::from_str(text).map_err(|e| format!("invalid enablement selectors: {e}"))?;
    for s in &sels {
        for sel in [&s.pod_selector, &s.namespace_selector]
            .into_iter()
            .flatten()
        {
            for req in sel.match_expressions.iter().flatten() {
                match req.operator.as_str() {
                    "In" | "NotIn" if req.values.as_ref().is_some_and(|v| !v.is_empty()) => {}
                    "Exists" | "DoesNotExist" if req.values.as_ref().is_none_or(Vec::is_empty) => {}
                    op => {
                        return Err(format!(
                            "invalid enablement selectors: operator {op:?} on key {:?} with values {:?}",
                            req.key, req.values
                        ))
                    }
                }
            }
        }
    }
    Ok(sels)
}

/// Kubernetes label-selector semantics (empty selects everything).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|req| {
            let values = req.values.as_deref().unwrap_or_default();
            let have = labels.get(&req.key);
            match req.operator.as_str() {
                "In" => have.is_some_and(|v| values.contains(v)),
                "NotIn" => have.is_none_or(|v| !values.contains(v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
}

/// The agent's policy settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Compiled enablement selectors.
    pub selectors: Vec<EnablementSelector>,
    /// Namespaces never captured (`EXCLUDE_NAMESPACES`).
    pub exclude_namespaces: Vec<String>,
    /// Where ztunnel runs (`SYSTEM_NAMESPACE`).
    pub system_namespace: String,
    /// Global options (DNS capture, IPv6, probe SNAT addresses); pods may override some.
    pub inpod: InpodConfig,
    /// Program Istio's sidecar redirection into injected pods at ADD (istio-cni does, always).
    pub sidecar_mode: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            // The default text is a constant that parses.
            selectors: parse_selectors("").unwrap_or_default(),
            exclude_namespaces: vec!["kube-system".into()],
            system_namespace: "istio-system".into(),
            inpod: InpodConfig::default(),
            sidecar_mode: true,
        }
    }
}

/// Why a pod is not captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `hostNetwork: true`: its netns is the node's.
    HostNetwork,
    /// Sidecar-injected.
    Sidecar,
    /// In an excluded namespace.
    ExcludedNamespace,
    /// Succeeded or Failed.
    Terminal,
    /// A ztunnel pod.
    Ztunnel,
    /// No enablement selector matches.
    NotSelected,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HostNetwork => "hostNetwork pod",
            Self::Sidecar => "sidecar-injected pod",
            Self::ExcludedNamespace => "namespace is excluded",
            Self::Terminal => "pod has terminated",
            Self::Ztunnel => "ztunnel pod",
            Self::NotSelected => "no enablement selector matches (labels)",
        })
    }
}

impl Policy {
    /// `Ok(())` if the pod belongs in the mesh, else why not.
    pub fn evaluate(&self, pod: &Pod, ns_labels: &BTreeMap<String, String>) -> Result<(), Skip> {
        let id = pods::pod_id(pod);
        let labels = pods::labels(pod);
        if pods::host_network(pod) {
            return Err(Skip::HostNetwork);
        }
        if pods::annotation(pod, SIDECAR_STATUS).is_some() {
            return Err(Skip::Sidecar);
        }
        if self.exclude_namespaces.contains(&id.namespace) {
            return Err(Skip::ExcludedNamespace);
        }
        if pods::is_terminal(pod) {
            return Err(Skip::Terminal);
        }
        if id.namespace == self.system_namespace
            && labels.get("app").map(String::as_str) == Some("ztunnel")
        {
            return Err(Skip::Ztunnel);
        }
        // The agent's own pods get no exemption: they run with hostNetwork (never reach
        // CNI, refused above), so a name-based one would only be a capture bypass.
        let everything = LabelSelector::default();
        let selected = self.selectors.iter().any(|s| {
            selector_matches(s.pod_selector.as_ref().unwrap_or(&everything), &labels)
                && selector_matches(
                    s.namespace_selector.as_ref().unwrap_or(&everything),
                    ns_labels,
                )
        });
        if selected {
            Ok(())
        } else {
            Err(Skip::NotSelected)
        }
    }

    /// Whether no pod of a namespace with `labels` can be in the mesh, whatever the pod's
    /// own labels: excluded, or every selector entry's namespace selector refuses it. With
    /// Istio's default selectors this never holds for a non-excluded namespace (a pod labelled
    /// `istio.io/dataplane-mode=ambient` is selected in any namespace).
    pub fn namespace_excludes_all(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.exclude_namespaces.iter().any(|n| n == name) {
            return true;
        }
        let everything = LabelSelector::default();
        !self
            .selectors
            .iter()
            .any(|s| selector_matches(s.namespace_selector.as_ref().unwrap_or(&everything), labels))
    }

    /// Whether a namespace label change can change any pod's verdict (some non-empty
    /// namespace selector matches one side and not the other).
    pub fn namespace_matters(
        &self,
        old: &BTreeMap<String, String>,
        new: &BTreeMap<String, String>,
    ) -> bool {
        let m = |labels| {
            self.selectors.iter().any(|s| {
                s.namespace_selector
                    .as_ref()
                    .filter(|sel| **sel != LabelSelector::default())
                    .is_some_and(|sel| selector_matches(sel, labels))
            })
        };
        m(old) != m(new)
    }

    /// The pod's in-pod options: the globals with its annotations applied.
    /// Bad annotation values are ignored and reported as warnings.
    pub fn inpod_config(&self, pod: &Pod) -> (InpodConfig, Vec<String>) {
        let mut cfg = self.inpod.clone();
        let mut warnings = Vec::new();
        let mut flag = |key: &str, target: &mut bool| {
            if let Some(v) = pods::annotation(pod, key) {
                match parse_bool(v) {
                    Some(b) => *target = b,
                    None => warnings.push(format!("ignoring {key}={v:?}: not a boolean")),
                }
            }
        };
        flag(BYPASS_INBOUND, &mut cfg.bypass_inbound);
        flag(DNS_CAPTURE, &mut cfg.dns_capture);
        if let Some(v) = pods::annotation(pod, VIRTUAL_INTERFACES) {
            let names: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            match names
                .iter()
                .try_for_each(|n| iptables_rules::config::validate_ifname(n))
            {
                Ok(()) => cfg.virtual_interfaces = names,
                Err(e) => warnings.push(format!("ignoring {VIRTUAL_INTERFACES}={v:?}: {e}")),
            }
        }
        (cfg, warnings)
    }
}

/// Go's `strconv.ParseBool`, which Istio uses for these annotations.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base(ns: &str, name: &str) -> serde_json::Value {
        json!({"metadata": {"namespace": ns, "name": name, "uid": "u1"}, "spec": {"containers": []}, "status": {"phase": "Running"}})
    }

    #[test]
    fn default_selectors_table() {
        let p = Policy::default();
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let plain = labels(&[]);
        let with = |pod_labels: serde_json::Value| {
            let mut v = base("shop", "web");
            v["metadata"]["labels"] = pod_labels;
            pod(v)
        };
        let cases = [
            // (pod labels, namespace labels, expected)
            (json!({}), &ambient, Ok(())),
            (json!({}), &plain, Err(Skip::NotSelected)),
            (json!({DATAPLANE_MODE: "ambient"}), &plain, Ok(())),
            (
                json!({DATAPLANE_MODE: "none"}),
                &ambient,
                Err(Skip::NotSelected),
            ),
            (json!({DATAPLANE_MODE: "ambient"}), &ambient, Ok(())),
            (json!({DATAPLANE_MODE: "sidecar"}), &ambient, Ok(())),
            (
                json!({"app": "x"}),
                &labels(&[(DATAPLANE_MODE, "none")]),
                Err(Skip::NotSelected),
            ),
        ];
        for (pl, nl, want) in cases {
            assert_eq!(
                p.evaluate(&with(pl.clone()), nl),
                want,
                "pod {pl} ns {nl:?}"
            );
        }
    }

    #[test]
    fn exclusions_win_over_selectors() {
        let p = Policy::default();
        let ns = labels(&[(DATAPLANE_MODE, "ambient")]);
        let mut host = base("shop", "h");
        host["spec"]["hostNetwork"] = json!(true);
        let mut sidecar = base("shop", "s");
        sidecar["metadata"]["annotations"] = json!({SIDECAR_STATUS: "{}"});
        let mut done = base("shop", "d");
        done["status"]["phase"] = json!("Succeeded");
        let mut failed = base("shop", "f");
        failed["status"]["phase"] = json!("Failed");
        let mut zt = base("istio-system", "ztunnel-abc");
        zt["metadata"]["labels"] = json!({"app": "ztunnel"});
        let cases = [
            (host, Skip::HostNetwork),
            (sidecar, Skip::Sidecar),
            (base("kube-system", "coredns"), Skip::ExcludedNamespace),
            (done, Skip::Terminal),
            (failed, Skip::Terminal),
            (zt, Skip::Ztunnel),
        ];
        for (v, want) in cases {
            assert_eq!(p.evaluate(&pod(v.clone()), &ns), Err(want), "{v}");
        }
        // Not ztunnel outside the system namespace.
        let mut other = base("shop", "ztunnel-abc");
        other["metadata"]["labels"] = json!({"app": "ztunnel"});
        assert_eq!(p.evaluate(&pod(other), &ns), Ok(()));
        // The agent's pod name is no exemption (its pods run with hostNetwork).
        assert_eq!(
            p.evaluate(&pod(base("istio-system", "ambient-cni-node-x1")), &ns),
            Ok(())
        );
        assert_eq!(
            p.evaluate(&pod(base("istio-system", "istiod-1")), &ns),
            Ok(())
        );
    }

    #[test]
    fn custom_selectors_and_operators() {
        let sels = parse_selectors(
            r#"[{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}, {"key": "legacy", "operator": "DoesNotExist"}]}},
                {"namespaceSelector": {"matchExpressions": [{"key": "mesh", "operator": "Exists"}]}}]"#,
        )
        .unwrap();
        let p = Policy {
            selectors: sels,
            ..Policy::default()
        };
        let mk = |l: serde_json::Value| {
            let mut v = base("shop", "w");
            v["metadata"]["labels"] = l;
            pod(v)
        };
        let none = labels(&[]);
        assert_eq!(p.evaluate(&mk(json!({"tier": "web"})), &none), Ok(()));
        assert_eq!(
            p.evaluate(&mk(json!({"tier": "db"})), &none),
            Err(Skip::NotSelected)
        );
        assert_eq!(
            p.evaluate(&mk(json!({"tier": "web", "legacy": "1"})), &none),
            Err(Skip::NotSelected)
        );
        assert_eq!(p.evaluate(&mk(json!({})), &labels(&[("mesh", "")])), Ok(()));
    }

    #[test]
    fn empty_selector_list_selects_nothing_and_bad_ones_are_refused() {
        let p = Policy {
            selectors: parse_selectors("[]").unwrap(),
            ..Policy::default()
        };
        assert_eq!(
            p.evaluate(&pod(base("shop", "w")), &labels(&[])),
            Err(Skip::NotSelected)
        );
        assert!(
            parse_selectors("- podSelector: {matchExpressions: [{key: a, operator: Near}]}")
                .is_err()
        );
        assert!(
            parse_selectors("- podSelector: {matchExpressions: [{key: a, operator: In}]}").is_err()
        );
        assert!(parse_selectors("{not: a list}").is_err());
    }

    #[test]
    fn namespaces_that_exclude_every_pod() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        let none = labels(&[(DATAPLANE_MODE, "none")]);
        let plain = labels(&[]);
        let only_ns = Policy {
            selectors: parse_selectors(
                "- namespaceSelector: {matchLabels: {istio.io/dataplane-mode: ambient}}",
            )
            .unwrap(),
            ..Policy::default()
        };
        let empty_entry = Policy {
            selectors: parse_selectors("- {}").unwrap(),
            ..Policy::default()
        };
        let nothing = Policy {
            selectors: parse_selectors("[]").unwrap(),
            ..Policy::default()
        };
        let default = Policy::default();
        let cases = [
            // (policy, namespace, labels, excludes every pod)
            (&default, "kube-system", &ambient, true),
            // The default's podSelector-only entry selects a labelled pod in any namespace.
            (&default, "shop", &plain, false),
            (&default, "shop", &none, false),
            (&default, "shop", &ambient, false),
            (&only_ns, "shop", &plain, true),
            (&only_ns, "shop", &none, true),
            (&only_ns, "shop", &ambient, false),
            (&only_ns, "kube-system", &ambient, true),
            (&empty_entry, "shop", &plain, false),
            (&nothing, "shop", &ambient, true),
        ];
        for (p, name, l, want) in cases {
            assert_eq!(
                p.namespace_excludes_all(name, l),
                want,
                "{name} {l:?} {:?}",
                p.selectors
            );
        }
    }

    #[test]
    fn namespace_label_changes_that_matter() {
        let p = Policy::default();
        let on = labels(&[(DATAPLANE_MODE, "ambient")]);
        let off = labels(&[]);
        assert!(p.namespace_matters(&off, &on));
        assert!(p.namespace_matters(&on, &off));
        assert!(!p.namespace_matters(&off, &labels(&[("team", "a")])));
    }

    #[test]
    fn annotations_override_globals_and_bad_values_warn() {
        let p = Policy::default();
        let mut v = base("shop", "w");
        v["metadata"]["annotations"] =
            json!({BYPASS_INBOUND: "true", DNS_CAPTURE: "F", VIRTUAL_INTERFACES: " tun0, tun1 ,"});
        let (cfg, warnings) = p.inpod_config(&pod(v));
        assert!(cfg.bypass_inbound && !cfg.dns_capture && warnings.is_empty());
        assert_eq!(cfg.virtual_interfaces, vec!["tun0", "tun1"]);

        let mut v = base("shop", "w");
        v["metadata"]["annotations"] =
            json!({BYPASS_INBOUND: "yes", DNS_CAPTURE: "maybe", VIRTUAL_INTERFACES: "eth0;rm -rf"});
        let (cfg, warnings) = p.inpod_config(&pod(v));
        assert_eq!(cfg, p.inpod);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }
}
