//! `doctor`: walks the capture path for one pod and says, for each link, pass or
//! fail and what to do about it (the checks people otherwise do by hand with
//! nsenter, iptables-save and kubectl).

use std::time::SystemTime;

use ambient_cni_api::admin::Check;

use super::controller::Controller;
use super::policy::{Skip, DATAPLANE_MODE};
use super::table::Phase;

fn check(name: &str, result: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        result: result.into(),
        detail: detail.into(),
        fix: fix.into(),
    }
}

fn fix_for(skip: Skip, ns: &str, pod: &str) -> String {
    match skip {
        Skip::NotSelected => format!(
            "label the namespace (`kubectl label ns {ns} {DATAPLANE_MODE}=ambient`) or the pod \
             (`kubectl label pod -n {ns} {pod} {DATAPLANE_MODE}=ambient`), and make sure the pod \
             is not labelled `{DATAPLANE_MODE}=none`"
        ),
        Skip::ExcludedNamespace => {
            format!("remove {ns} from EXCLUDE_NAMESPACES if it should be captured")
        }
        Skip::HostNetwork => {
            "hostNetwork pods share the node's netns and are never captured".into()
        }
        Skip::Sidecar => {
            "the pod has a sidecar (sidecar.istio.io/status); remove injection to use ambient"
                .into()
        }
        Skip::Terminal => "the pod has finished; nothing to capture".into(),
        Skip::Ztunnel => "mesh infrastructure is never captured".into(),
    }
}

/// The drift verifier's last result for the pod (informational when there is none yet).
fn last_verification(ctl: &Controller, uid: &str) -> Check {
    let Some(v) = ctl.enroller().table.verified(uid) else {
        return check(
            "last verification",
            "info",
            "not verified yet (the verifier checks each held pod once per VERIFY_INTERVAL; 0 turns it off)",
            "",
        );
    };
    let ago = SystemTime::now()
        .duration_since(v.at)
        .map_or(0, |d| d.as_secs());
    let at = format!("{ago}s ago: {}", v.outcome);
    if v.outcome.in_place() {
        check("last verification", "pass", at, "")
    } else {
        check(
            "last verification",
            "fail",
            at,
            "the verifier retries every VERIFY_INTERVAL; see the agent's logs and the pod's \
             AmbientCaptureDrift Events for what keeps changing its rules",
        )
    }
}

/// Runs every check for `ns/name`; returns the checks and whether the pod is healthy.
pub async fn doctor(ctl: &Controller, ns: &str, name: &str) -> (Vec<Check>, bool) {
    let mut out = Vec::new();
    let ready = ctl.is_ready();
    out.push(if ready {
        check(
            "agent ready",
            "pass",
            "state rebuilt, plugin socket serving",
            "",
        )
    } else {
        check(
            "agent ready",
            "fail",
            "still rebuilding its state",
            "wait, then look at the agent's logs",
        )
    });
    let Some(found) = ctl.cached(ns, name) else {
        out.push(check(
            "pod known",
            "fail",
            format!("{ns}/{name} is not among this node's pods in the agent's pod source"),
            "check the name and that the pod runs on this node (`kubectl get pod -o wide`)",
        ));
        return (out, false);
    };
    out.push(check(
        "pod known",
        "pass",
        format!("uid {}", found.pod.metadata.uid.clone().unwrap_or_default()),
        "",
    ));
    let ns_label = found
        .namespace_labels
        .get(DATAPLANE_MODE)
        .cloned()
        .unwrap_or_else(|| "(unset)".into());
    let pod_label = found
        .pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(DATAPLANE_MODE).cloned())
        .unwrap_or_else(|| "(unset)".into());
    let labels = format!("namespace {DATAPLANE_MODE}={ns_label}, pod {DATAPLANE_MODE}={pod_label}");
    let verdict = ctl.policy().evaluate(&found.pod, &found.namespace_labels);
    let held = ctl.enroller().table.find(ns, name);
    match verdict {
        Err(skip) => {
            out.push(check(
                "selected for the mesh",
                "info",
                format!("not in the mesh: {skip} ({labels})"),
                fix_for(skip, ns, name),
            ));
            let healthy = held.is_none();
            out.push(if healthy {
                check(
                    "not held",
                    "pass",
                    "the agent correctly does not capture it",
                    "",
                )
            } else {
                check(
                    "not held",
                    "fail",
                    "the agent still holds it",
                    "it is being released; see the agent's logs",
                )
            });
            return (out, healthy);
        }
        Ok(()) => out.push(check("selected for the mesh", "pass", labels, "")),
    }
    let (cfg, warnings) = ctl.policy().inpod_config(&found.pod);
    for w in warnings {
        out.push(check(
            "annotations",
            "fail",
            w,
            "fix the annotation value (booleans: true/false)",
        ));
    }
    let Some(h) = held else {
        out.push(check(
            "held by the agent",
            "fail",
            "selected, but the agent holds no enrolment for it",
            "a new pod is enrolled by its CNI ADD: check the conflist has ambient-cni and the kubelet's \
             sandbox events; a running pod is found by a /proc scan: check the agent's logs",
        ));
        return (out, false);
    };
    out.push(check(
        "held by the agent",
        "pass",
        format!("phase {}", h.phase.as_str()),
        "",
    ));
    let Some(netns) = h.netns.clone() else {
        out.push(check(
            "netns found",
            "fail",
            h.last_error.clone().unwrap_or_else(|| "netns unknown".into()),
            "the pod's processes were not found under HOST_PROC; check the /proc mount and cgroup layout",
        ));
        return (out, false);
    };
    out.push(check(
        "netns found",
        "pass",
        format!(
            "{} ({})",
            h.netns_path.clone().unwrap_or_default(),
            netns.id()
        ),
        "",
    ));
    let r = ctl.enroller().rules().clone();
    let show = tokio::task::spawn_blocking(move || r.show(&netns, &cfg)).await;
    let mut healthy = true;
    match show {
        Ok(Ok(report)) => {
            let rules_ok = report.installed.matches_expected;
            out.push(check(
                "in-pod rules",
                if rules_ok { "pass" } else { "fail" },
                format!("{} backend, {}", report.installed.backend, if rules_ok { "as expected" } else { "missing or different" }),
                if rules_ok { "" } else { "the agent re-applies on restart; to fix now: `ambient-cni-agent redirect apply --netns <path>`" },
            ));
            let route_ok = report.route.rule_v4 && report.route.route_v4;
            out.push(check(
                "policy route",
                if route_ok { "pass" } else { "fail" },
                format!("{:?}", report.route),
                if route_ok { "" } else { "missing `ip rule fwmark 0x111/0xfff lookup 100` or `local 0.0.0.0/0 dev lo table 100`: re-apply the rules" },
            ));
            healthy &= rules_ok && route_ok;
        }
        Ok(Err(e)) => {
            out.push(check(
                "in-pod rules",
                "fail",
                e.to_string(),
                "see the error; the netns may be gone",
            ));
            healthy = false;
        }
        Err(e) => {
            out.push(check("in-pod rules", "fail", e.to_string(), ""));
            healthy = false;
        }
    }
    out.push(last_verification(ctl, &h.id.uid));
    let conns = ctl.enroller().ztunnels();
    out.push(if conns > 0 {
        check(
            "ztunnel connected",
            "pass",
            format!("{conns} connection(s)"),
            "",
        )
    } else {
        check(
            "ztunnel connected",
            "fail",
            "no ztunnel on the ZDS socket",
            "check the ztunnel DaemonSet pod on this node and ZTUNNEL_UDS_ADDRESS",
        )
    });
    let acked = h.phase == Phase::Enabled;
    out.push(if acked {
        check("ztunnel acked", "pass", "ztunnel took the pod", "")
    } else {
        check(
            "ztunnel acked",
            "fail",
            h.last_error.clone().unwrap_or_else(|| "not yet".into()),
            "the pod stays pending (its TCP goes nowhere) until ztunnel accepts it; see ztunnel's logs",
        )
    });
    let annotation = found
        .pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("ambient.istio.io/redirection").cloned());
    out.push(match annotation {
        Some(v) if v == h.phase.as_str() => check(
            "status annotation",
            "pass",
            format!("ambient.istio.io/redirection={v}"),
            "",
        ),
        Some(v) => check(
            "status annotation",
            "fail",
            format!("annotation says {v}, agent says {}", h.phase.as_str()),
            "it is updated on the next enrolment step",
        ),
        None => check(
            "status annotation",
            "info",
            "not set (local pod source, or not yet patched)",
            "",
        ),
    });
    healthy &= conns > 0 && acked;
    (out, healthy)
}
