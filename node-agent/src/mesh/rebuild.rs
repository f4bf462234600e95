//! The restart rebuild: after a (re)start, the held set is rebuilt from the netns records,
//! the pods the pod source says are in the mesh, and a /proc scan; records of pods deleted
//! while the agent was down are dropped, and pods that left the mesh meanwhile get their
//! rules removed. ztunnel gets the result as its first snapshot. Only then
//! ([`after_snapshot`]) are the held pods' rules re-applied (idempotent) and the host probe
//! set resynced: rules stay in the pod netns while the agent is down, so the snapshot does
//! not depend on them, and re-applying 250 pods first would hold it up by a netns entry and
//! a netlink transaction each. Talks to the enroller only through its rebuild methods.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::SystemTime;

use iptables_rules::config::InpodConfig;
use tracing::{info, warn};

use super::enroller::Enroller;
use super::table::{Held, Phase};
use crate::pods::PodId;

/// A pod the pod source says belongs in the mesh.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Identity.
    pub id: PodId,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// Its IPs (empty: not started yet).
    pub ips: Vec<IpAddr>,
    /// Its rules options.
    pub cfg: InpodConfig,
}

/// What the rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rebuilt {
    /// Pods held afterwards.
    pub held: usize,
    /// Pods found in their netns, whose rules [`after_snapshot`] re-applies.
    pub reapplied: usize,
    /// Records dropped (pod deleted or released while the agent was down).
    pub dropped: usize,
}

/// Rebuilds the held set. `wanted`: pods in the mesh now; `existing`: every pod the
/// source knows (a recorded pod that exists but is not wanted left the mesh: its rules
/// are removed with `default_cfg`).
pub async fn rebuild(
    enroller: &Enroller,
    wanted: &[Wanted],
    existing: &HashSet<String>,
    default_cfg: &InpodConfig,
) -> Rebuilt {
    let records = enroller.records().await;
    let wanted_uids: HashSet<&str> = wanted.iter().map(|w| w.id.uid.as_str()).collect();
    let mut by_uid = enroller
        .open_recorded(
            records
                .iter()
                .filter(|r| wanted_uids.contains(r.uid.as_str()))
                .cloned()
                .collect(),
        )
        .await;
    // Pods with no usable record: look for their processes.
    let to_scan: HashMap<String, Vec<IpAddr>> = wanted
        .iter()
        .filter(|w| !by_uid.contains_key(&w.id.uid) && !w.ips.is_empty())
        .map(|w| (w.id.uid.clone(), w.ips.clone()))
        .collect();
    for (uid, ns) in enroller.scan(to_scan).await {
        let label = ns.label().to_owned();
        by_uid.insert(uid, (ns, label));
    }
    let mut out = Rebuilt::default();
    for w in wanted {
        let netns = by_uid.get(&w.id.uid).cloned();
        let record = records.iter().find(|r| r.uid == w.id.uid);
        if netns.is_none() && record.is_none() {
            // Never enrolled and not found: a new pod whose CNI ADD is still to come.
            continue;
        }
        let held = Held {
            id: w.id.clone(),
            service_account: w.service_account.clone(),
            netns: netns.as_ref().map(|(n, _)| n.clone()),
            netns_path: netns.as_ref().map(|(_, p)| p.clone()),
            cfg: w.cfg.clone(),
            ips: w.ips.clone(),
            // The recorded sandbox, when its netns is the recorded one (else a scan found it).
            container_id: record
                .filter(|r| {
                    netns
                        .as_ref()
                        .is_some_and(|(n, _)| n.id().ino == r.netns_inode)
                })
                .and_then(|r| r.container_id.clone()),
            phase: Phase::Pending,
            last_error: netns
                .is_none()
                .then(|| "netns not found after restart".to_owned()),
            since: SystemTime::now(),
        };
        if held.netns.is_some() {
            out.reapplied += 1;
        }
        enroller.restore(held);
    }
    // Records of pods that are gone or no longer selected.
    for rec in records {
        if enroller.holds(&rec.uid) {
            continue;
        }
        let id = PodId {
            namespace: rec.namespace.clone(),
            name: rec.name.clone(),
            uid: rec.uid.clone(),
        };
        if existing.contains(&rec.uid) {
            // Still exists but left the mesh while we were down: take its rules out.
            enroller.remove_recorded_rules(&rec, default_cfg).await;
        }
        info!(pod = %id, "dropping a pod deleted or released while the agent was down");
        enroller.forget_record(&rec.uid);
        out.dropped += 1;
    }
    out.held = enroller.held_count();
    out
}

/// After the first snapshot went out: re-applies the rules of every held pod found in its
/// netns (each under its pod's lock, so a concurrent ADD or DEL wins), then makes the host
/// probe set hold exactly the held pods. Returns how many pods' re-apply failed (each is
/// logged; the drift verifier finds them again).
pub async fn after_snapshot(enroller: &Enroller) -> usize {
    let mut failed = 0;
    for uid in enroller.held_uids() {
        if let Err(e) = enroller.reapply_held(&uid).await {
            warn!(error = %e, "re-applying rules after restart failed");
            failed += 1;
        }
    }
    enroller.resync_probes();
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::fakes::{fake_netns_ino, Fakes};
    use crate::mesh::persist::{Record, RecordStore};

    fn id(uid: &str) -> PodId {
        PodId {
            namespace: "mesh".into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
        }
    }

    fn wanted(uid: &str) -> Wanted {
        Wanted {
            id: id(uid),
            service_account: "default".into(),
            ips: vec!["10.1.2.3".parse().unwrap()],
            cfg: InpodConfig::default(),
        }
    }

    fn record(uid: &str, sandbox: Option<&str>) -> Record {
        Record {
            uid: uid.into(),
            namespace: "mesh".into(),
            name: format!("pod-{uid}"),
            netns_path: format!("/var/run/netns/{uid}"),
            netns_inode: fake_netns_ino(),
            container_id: sandbox.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn records_and_the_pod_source_rebuild_the_held_set() {
        let fx = Fakes::new();
        for rec in [
            record("kept", Some("c-kept")),
            record("lost", None),
            record("deleted", None),
            record("left", None),
        ] {
            fx.store.save(&rec).unwrap();
        }
        {
            let mut gone = fx.netns.gone.lock().unwrap();
            gone.insert("/var/run/netns/lost".into());
            gone.insert("/var/run/netns/deleted".into());
        }
        // Enrolled by a relabel (no record was written before the crash): found by a scan.
        fx.netns.running.lock().unwrap().insert("scanned".into());
        fx.log.clear();
        let e = fx.enroller();
        let want = [
            wanted("kept"),
            wanted("lost"),
            wanted("scanned"),
            wanted("new"),
        ];
        let existing: HashSet<String> = ["kept", "lost", "scanned", "new", "left"]
            .map(str::to_owned)
            .into();

        let done = rebuild(&e, &want, &existing, &InpodConfig::default()).await;
        // Before the snapshot: nothing written in any pod netns but the rules of the pod
        // that left the mesh, and the probe set untouched.
        assert_eq!(
            fx.log.starting("rules"),
            ["rules remove /var/run/netns/left"]
        );
        assert!(fx.log.starting("probes").is_empty());
        assert_eq!(after_snapshot(&e).await, 0);

        assert_eq!(
            done,
            Rebuilt {
                held: 3,
                reapplied: 2,
                dropped: 2
            }
        );
        let kept = e.table.get("kept").unwrap();
        assert_eq!(kept.phase, Phase::Pending, "ztunnel's snapshot enables it");
        assert_eq!(kept.netns_path.as_deref(), Some("/var/run/netns/kept"));
        assert_eq!(
            kept.container_id.as_deref(),
            Some("c-kept"),
            "DEL stays keyed"
        );
        let lost = e.table.get("lost").unwrap();
        assert!(lost.netns.is_none());
        assert!(lost.last_error.is_some());
        assert!(e.table.get("scanned").unwrap().netns.is_some());
        assert!(e.table.get("new").is_none(), "its CNI ADD is still to come");
        assert!(e.table.get("left").is_none());
        assert!(e.table.get("deleted").is_none());
        // Rules re-applied where the netns was found; the pod that left the mesh while
        // the agent was down gets its rules removed; a deleted pod's are left to die with it.
        let mut rules = fx.log.starting("rules");
        rules.sort();
        assert_eq!(
            rules,
            [
                "rules apply /proc/1/ns/net#scanned",
                "rules apply /var/run/netns/kept",
                "rules remove /var/run/netns/left",
            ]
        );
        assert_eq!(
            fx.log.starting("record remove"),
            ["record remove deleted", "record remove left"]
        );
        assert_eq!(
            fx.log.starting("probes"),
            ["probes resync kept,lost,scanned"]
        );
        assert!(
            fx.log.starting("ztunnel").is_empty(),
            "ztunnel is not there yet"
        );
    }

    #[tokio::test]
    async fn a_recorded_path_now_holding_another_netns_is_not_trusted() {
        let fx = Fakes::new();
        let mut rec = record("kept", Some("c1"));
        rec.netns_inode += 1;
        fx.store.save(&rec).unwrap();
        fx.netns.running.lock().unwrap().insert("kept".into());
        let e = fx.enroller();
        let existing: HashSet<String> = ["kept".to_owned()].into();
        rebuild(&e, &[wanted("kept")], &existing, &InpodConfig::default()).await;
        let held = e.table.get("kept").unwrap();
        assert_eq!(
            held.netns_path.as_deref(),
            Some("/proc/1/ns/net#kept"),
            "found again by a scan"
        );
        assert_eq!(held.container_id, None, "not the recorded sandbox's netns");
    }
}
