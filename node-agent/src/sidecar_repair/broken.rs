//! Which pods are broken by the race (pure): a pod scheduled before the agent could program
//! it has its `istio-validation` init container fail with exit code 126. Istio's filter
//! (`cni/pkg/repair/repaircontroller.go` `matchesFilter`), read the same way.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

/// What marks a pod broken (Istio's `REPAIR_*` filters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenFilter {
    /// Only pods carrying this annotation (empty: every pod).
    pub sidecar_annotation: String,
    /// Only this init container (empty: any).
    pub init_container_name: String,
    /// Its termination message, trimmed (empty: any).
    pub termination_message: String,
    /// Its exit code (0: any).
    pub exit_code: i32,
}

impl BrokenFilter {
    fn matches(&self, t: &ContainerStateTerminated) -> bool {
        let want_msg = self.termination_message.trim();
        let msg_ok = want_msg.is_empty() || want_msg == t.message.as_deref().unwrap_or("").trim();
        let code_ok = self.exit_code == 0 || self.exit_code == t.exit_code;
        msg_ok && code_ok
    }
}

/// True when `pod` has a matching init container whose last run failed as the filter says.
///
/// As Istio: a container that currently terminated successfully is never broken, and its
/// last termination state is read. Beyond Istio, a *current* matching failure counts too:
/// the first failure shows there, before the kubelet's back-off restarts the container and
/// moves it to the last state, so the repair lands one back-off earlier.
pub fn is_broken(pod: &Pod, filter: &BrokenFilter) -> bool {
    if !filter.sidecar_annotation.is_empty() {
        let has = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(&filter.sidecar_annotation));
        if !has {
            return false;
        }
    }
    let Some(statuses) = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
    else {
        return false;
    };
    for c in statuses {
        if !filter.init_container_name.is_empty() && c.name != filter.init_container_name {
            continue;
        }
        let current = c.state.as_ref().and_then(|s| s.terminated.as_ref());
        if let Some(t) = current {
            if t.reason.as_deref() == Some("Completed") || t.exit_code == 0 {
                continue;
            }
            if filter.matches(t) {
                return true;
            }
        }
        let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        if last.is_some_and(|t| filter.matches(t)) {
            return true;
        }
    }
    false
}

/// True when the pod may still be acted on: not being deleted, not finished.
pub fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !crate::pods::is_terminal(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateRunning, ContainerStatus};
    use serde_json::json;

    fn filter() -> BrokenFilter {
        BrokenFilter {
            sidecar_annotation: "sidecar.istio.io/status".into(),
            init_container_name: "istio-validation".into(),
            termination_message: String::new(),
            exit_code: 126,
        }
    }

    fn terminated(code: i32, reason: &str, msg: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(reason.into()).filter(|r: &String| !r.is_empty()),
                message: Some(msg.into()).filter(|m: &String| !m.is_empty()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn running() -> ContainerState {
        ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        }
    }

    fn pod(annotated: bool, statuses: Vec<ContainerStatus>) -> Pod {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        if annotated {
            p.metadata.annotations = Some(
                [("sidecar.istio.io/status".to_string(), "{}".to_string())]
                    .into_iter()
                    .collect(),
            );
        }
        if let Some(st) = p.status.as_mut() {
            st.init_container_statuses = Some(statuses);
        }
        p
    }

    fn status(
        name: &str,
        state: Option<ContainerState>,
        last: Option<ContainerState>,
    ) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state,
            last_state: last,
            ..Default::default()
        }
    }

    #[test]
    fn a_failed_validation_is_broken_and_nothing_else_is() {
        let v = "istio-validation";
        let fail = || Some(terminated(126, "Error", ""));
        // (case, annotated, init container statuses, broken?)
        let table: Vec<(&str, bool, Vec<ContainerStatus>, bool)> = vec![
            (
                "last state 126",
                true,
                vec![status(v, Some(running()), fail())],
                true,
            ),
            (
                "current state 126 (first failure)",
                true,
                vec![status(v, fail(), None)],
                true,
            ),
            (
                "waiting in back-off, last 126",
                true,
                vec![status(v, None, fail())],
                true,
            ),
            ("no annotation", false, vec![status(v, None, fail())], false),
            (
                "another init container",
                true,
                vec![status("init", None, fail())],
                false,
            ),
            (
                "another exit code",
                true,
                vec![status(v, None, Some(terminated(1, "Error", "")))],
                false,
            ),
            (
                "completed now, failed before (repaired or fixed)",
                true,
                vec![status(v, Some(terminated(0, "Completed", "")), fail())],
                false,
            ),
            (
                "reason Completed wins over a code",
                true,
                vec![status(v, Some(terminated(126, "Completed", "")), None)],
                false,
            ),
            (
                "running, never failed",
                true,
                vec![status(v, Some(running()), None)],
                false,
            ),
            ("no statuses yet", true, vec![], false),
            (
                "second of two matches",
                true,
                vec![status("init", None, None), status(v, None, fail())],
                true,
            ),
        ];
        for (case, annotated, statuses, want) in table {
            assert_eq!(
                is_broken(&pod(annotated, statuses), &filter()),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn empty_filters_match_anything() {
        let any = BrokenFilter {
            sidecar_annotation: String::new(),
            init_container_name: String::new(),
            termination_message: String::new(),
            exit_code: 0,
        };
        let p = pod(
            false,
            vec![status("x", None, Some(terminated(3, "Error", "")))],
        );
        assert!(is_broken(&p, &any));
        assert!(!is_broken(&p, &filter()));
    }

    #[test]
    fn the_termination_message_is_compared_trimmed() {
        let f = BrokenFilter {
            termination_message: " not ready \n".into(),
            ..filter()
        };
        let with = |msg: &str| {
            pod(
                true,
                vec![status(
                    "istio-validation",
                    None,
                    Some(terminated(126, "Error", msg)),
                )],
            )
        };
        assert!(is_broken(&with("not ready"), &f));
        assert!(is_broken(&with("\nnot ready  "), &f));
        assert!(!is_broken(&with("other"), &f));
        assert!(!is_broken(&with(""), &f));
    }

    #[test]
    fn deleted_or_finished_pods_are_left_alone() {
        let mut p = pod(true, vec![]);
        assert!(is_live(&p));
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(!is_live(&p));
        let mut p = pod(true, vec![]);
        p.status.as_mut().unwrap().phase = Some("Failed".into());
        assert!(!is_live(&p));
    }
}
