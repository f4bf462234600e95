//! One held pod's verification, under its lock: is its netns still the one held, are its
//! in-pod rules and policy route exactly what we apply (read back, nothing written), are its
//! IPs in the host probe set. On drift: the same apply as ADD, a re-announce to ztunnel only
//! when the netns changed, a count, a log line and a Warning Event naming the pod.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use iptables_rules::drift::{kinds, DriftKind, Finding};
use iptables_rules::netns::{Netns, NsId};
use tracing::{info, warn};

use super::metrics::VerifyMetrics;
use super::outcome::Outcome;
use crate::mesh::enroller::Enroller;
use crate::mesh::persist::Record;
use crate::mesh::table::{Held, Phase};

/// The Event reason posted on a pod whose capture was repaired.
pub const EVENT_REASON: &str = "AmbientCaptureDrift";

/// Where the held netns stands.
enum NetnsState {
    /// The path still names the held netns.
    Same,
    /// The pod now lives in another netns (found at its path or by a /proc scan).
    Changed(Netns, String),
    /// No netns of the pod can be found.
    Gone(String),
}

/// Verifies pod `uid` and repairs drift. `None`: skipped (not held, netns unknown, or an ADD/DEL
/// of the pod is in flight: they always win, and re-apply anyway).
pub async fn verify_pod(
    enroller: &Enroller,
    metrics: &VerifyMetrics,
    uid: &str,
) -> Option<Outcome> {
    let guard = enroller.try_pod_lock(uid)?;
    let held = enroller.table.get(uid)?;
    let (Some(ns), Some(path)) = (held.netns.clone(), held.netns_path.clone()) else {
        return None;
    };
    let outcome = match netns_state(enroller, &held, ns.id(), &path).await {
        NetnsState::Gone(e) => Outcome::Error(e),
        NetnsState::Changed(new, new_path) => {
            repair_netns(enroller, &held, new, new_path, ns.id()).await
        }
        NetnsState::Same => {
            let findings = readback(enroller, &held, &ns).await;
            if findings.is_empty() {
                Outcome::Clean
            } else {
                repair(enroller, &held, &findings).await
            }
        }
    };
    // The Event write may wait on the API server: an ADD/DEL of the pod must not wait for it.
    drop(guard);
    metrics.verified(&outcome);
    if let Outcome::Repaired { kinds, detail }
    | Outcome::RepairFailed {
        kinds,
        error: detail,
    } = &outcome
    {
        if matches!(outcome, Outcome::Repaired { .. }) {
            for k in kinds {
                metrics.repaired(*k);
            }
        }
        warn!(pod = %held.id, drift = %detail, result = outcome.label(), "in-pod capture drifted");
        let msg = format!(
            "ambient capture drifted and {}: {detail}",
            match outcome {
                Outcome::Repaired { .. } => "was repaired",
                _ => "could not be repaired yet",
            }
        );
        if let Err(e) = enroller.status().event(&held.id, EVENT_REASON, &msg).await {
            warn!(pod = %held.id, error = %e, "cannot post the drift Event");
        }
    }
    Some(outcome)
}

/// Checks the held path still names the held netns (a `stat`, no open); when it does not, looks
/// for the pod's current netns at the path, then by a /proc scan.
async fn netns_state(enroller: &Enroller, held: &Held, id: NsId, path: &str) -> NetnsState {
    let p = PathBuf::from(path);
    let same = std::fs::metadata(&p).is_ok_and(|m| m.dev() == id.dev && m.ino() == id.ino);
    if same {
        return NetnsState::Same;
    }
    let found = match enroller.open_netns(p.clone()).await {
        Ok(ns) => Some((ns, path.to_owned())),
        Err(_) => {
            let wanted = std::collections::HashMap::from([(held.id.uid.clone(), held.ips.clone())]);
            enroller
                .scan(wanted)
                .await
                .remove(&held.id.uid)
                .and_then(|ns| {
                    let label = ns.label().to_owned();
                    Arc::try_unwrap(ns).ok().map(|ns| (ns, label))
                })
        }
    };
    match found {
        // Same netns under another path (e.g. the scanned process exited, another remains).
        Some((ns, new_path)) if ns.id() == id => {
            enroller
                .table
                .update(&held.id.uid, |h| h.netns_path = Some(new_path));
            NetnsState::Same
        }
        Some((ns, new_path)) => NetnsState::Changed(ns, new_path),
        None => NetnsState::Gone(format!(
            "netns {path} ({id}) is gone and no process of the pod was found in the host's /proc"
        )),
    }
}

/// Reads back rules, route and probe-set entries; the differences from what we apply.
async fn readback(enroller: &Enroller, held: &Held, ns: &Arc<Netns>) -> Vec<Finding> {
    let (r, ns2, cfg) = (enroller.rules().clone(), ns.clone(), held.cfg.clone());
    let mut findings = match tokio::task::spawn_blocking(move || r.verify(&ns2, &cfg)).await {
        Ok(Ok(f)) => f,
        // Unreadable state (e.g. a rule we cannot parse) is repaired like drift: the apply
        // replaces our tables whole.
        Ok(Err(e)) => vec![unreadable(e)],
        Err(e) => vec![unreadable(e.to_string())],
    };
    // The probe set entry is added once ztunnel has taken the pod.
    if held.phase == Phase::Enabled {
        let (probes, uid, ips) = (
            enroller.probes().clone(),
            held.id.uid.clone(),
            held.ips.clone(),
        );
        match tokio::task::spawn_blocking(move || probes.check(&uid, &ips)).await {
            Ok(Ok(f)) => findings.extend(f),
            Ok(Err(e)) => warn!(pod = %held.id, error = %e, "cannot read the host probe set"),
            Err(e) => warn!(pod = %held.id, error = %e, "cannot read the host probe set"),
        }
    }
    findings
}

fn unreadable(e: String) -> Finding {
    Finding::SectionMissing {
        section: format!("unreadable in-pod state ({e})"),
    }
}

/// Findings shown in a log line or Event, at most, each rule line cut to [`MAX_LINE`]
/// characters, so a flushed table (tens of rules) still makes a readable Event.
const MAX_SHOWN: usize = 3;
const MAX_LINE: usize = 120;

fn describe(findings: &[Finding]) -> String {
    let mut parts: Vec<String> = findings
        .iter()
        .take(MAX_SHOWN)
        .map(|f| f.brief(MAX_LINE))
        .collect();
    if findings.len() > MAX_SHOWN {
        parts.push(format!("and {} more", findings.len() - MAX_SHOWN));
    }
    parts.join("; ")
}

/// Re-applies what drifted: the ADD's rules apply (rules and route together, atomic) and/or
/// the probe-set upsert.
async fn repair(enroller: &Enroller, held: &Held, findings: &[Finding]) -> Outcome {
    let kinds = kinds(findings);
    let detail = describe(findings);
    let in_pod = kinds.iter().any(|k| *k != DriftKind::ProbeSet);
    if in_pod {
        if let Err(e) = enroller.reapply(held).await {
            return Outcome::RepairFailed {
                kinds,
                error: e.to_string(),
            };
        }
    }
    if kinds.contains(&DriftKind::ProbeSet) {
        if let Err(e) = enroller.probes().upsert(&held.id.uid, &held.ips) {
            return Outcome::RepairFailed {
                kinds,
                error: format!("pod {}: host probe set: {e}", held.id),
            };
        }
    }
    Outcome::Repaired { kinds, detail }
}

/// The pod lives in a new netns (same UID, sandbox replaced without an ADD reaching us): the
/// ADD's steps there, then re-announce to ztunnel with the new netns.
async fn repair_netns(
    enroller: &Enroller,
    held: &Held,
    new: Netns,
    path: String,
    old: NsId,
) -> Outcome {
    let kinds = vec![DriftKind::Netns];
    let detail = format!("netns changed from {old} to {} ({path})", new.id());
    let new = Arc::new(new);
    let moved = Held {
        netns: Some(new.clone()),
        netns_path: Some(path.clone()),
        ..held.clone()
    };
    if let Err(e) = enroller.reapply(&moved).await {
        return Outcome::RepairFailed {
            kinds,
            error: format!("{detail}: {e}"),
        };
    }
    enroller.table.update(&held.id.uid, |h| {
        h.netns = Some(new.clone());
        h.netns_path = Some(path.clone());
        h.since = SystemTime::now();
    });
    let rec = Record::new(&held.id, path, new.id().ino, held.container_id.clone());
    if let Err(e) = enroller.save_record(&rec) {
        warn!(pod = %held.id, error = %e, "cannot record the pod's new netns");
    }
    match enroller.announce(&held.id).await {
        Ok(()) => {
            info!(pod = %held.id, "re-announced to ztunnel in its new netns");
            Outcome::Repaired { kinds, detail }
        }
        Err(e) => Outcome::RepairFailed {
            kinds,
            error: format!("{detail}: {e} (retried as a pending pod)"),
        },
    }
}
