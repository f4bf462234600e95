//! Moving one pod into or out of the mesh, in Istio's order (Istio's `cni/pkg/nodeagent/net.go`):
//! netns → in-pod rules → record → ZDS add + ack → probe set → status. Steps for one pod
//! are serialised; different pods proceed concurrently. Every effect is behind a small
//! trait ([`Effects`]), so the steps are unit-tested with the fakes in `mesh/fakes.rs`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use iptables_rules::config::InpodConfig;
use iptables_rules::netns::{Netns, NetnsError};
use tracing::{debug, info, info_span, warn, Instrument};

use super::hooks::{ProbeSet, StatusWriter};
use super::metrics::{pod_states, AddPhase, EnrolMetrics};
use super::netns::NetnsFinder;
use super::persist::{Record, RecordStore};
use super::rules::PodRules;
use super::table::{Held, Phase, Table};
use super::ztunnel::Ztunnel;
use crate::pods::PodId;

/// Why an enrolment step failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The pod's netns could not be opened or found (not retryable for this event).
    #[error("pod {pod}: netns: {msg}")]
    Netns {
        /// The pod.
        pod: PodId,
        /// What failed.
        msg: String,
    },
    /// Installing or removing the in-pod rules failed.
    #[error("pod {pod}: in-pod rules: {msg}")]
    Rules {
        /// The pod.
        pod: PodId,
        /// What failed.
        msg: String,
    },
    /// ztunnel did not take the pod (no connection, nack, timeout): retryable, pod pending.
    #[error("pod {pod}: ztunnel: {msg}")]
    Ztunnel {
        /// The pod.
        pod: PodId,
        /// What failed.
        msg: String,
    },
}

impl EnrollError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Ztunnel { .. } | Self::Rules { .. })
    }
}

/// The `result` label of an enrolment: `enabled`, `pending` (ztunnel did not take it),
/// `netns_error` or `rules_error`.
pub fn enrolment_result(r: &Result<(), EnrollError>) -> &'static str {
    match r {
        Ok(()) => "enabled",
        Err(EnrollError::Ztunnel { .. }) => "pending",
        Err(EnrollError::Netns { .. }) => "netns_error",
        Err(EnrollError::Rules { .. }) => "rules_error",
    }
}

/// Whether a runtime request for sandbox `requested` concerns the held pod whose
/// sandbox is `held`. Like the reference plugins, requests are keyed by container ID;
/// a pod held without one (enrolled by a namespace relabel or a /proc scan) and a
/// request without one (nothing to compare) match.
pub fn sandbox_matches(held: Option<&str>, requested: &str) -> bool {
    match held {
        Some(h) if !h.is_empty() && !requested.is_empty() => h == requested,
        _ => true,
    }
}

/// What is needed to enrol one pod.
#[derive(Debug, Clone)]
pub struct Request {
    /// Identity.
    pub id: PodId,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// A netns path to use (from `CNI_NETNS`), else the held one or a /proc scan.
    pub netns_path: Option<String>,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
    /// Rules options.
    pub cfg: InpodConfig,
    /// The CNI container id, if from a plugin ADD.
    pub container_id: Option<String>,
}

/// Does the steps; owns nothing but handles to the effects.
pub struct Enroller {
    /// Held pods.
    pub table: Arc<Table>,
    netns: Arc<dyn NetnsFinder>,
    rules: Arc<dyn PodRules>,
    ztunnel: std::sync::OnceLock<Arc<dyn Ztunnel>>,
    probes: Arc<dyn ProbeSet>,
    status: Arc<dyn StatusWriter>,
    store: Arc<dyn RecordStore>,
    zds_timeout: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<EnrolMetrics>,
    verify_requests: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// The effects an enroller drives (ztunnel comes later: [`Enroller::set_ztunnel`]).
pub struct Effects {
    /// Finds pod netns.
    pub netns: Arc<dyn NetnsFinder>,
    /// In-pod rules.
    pub rules: Arc<dyn PodRules>,
    /// Host probe set.
    pub probes: Arc<dyn ProbeSet>,
    /// Status annotation.
    pub status: Arc<dyn StatusWriter>,
    /// Netns records.
    pub store: Arc<dyn RecordStore>,
}

impl Enroller {
    /// An enroller over `table` with these effects, counting in `metrics`.
    pub fn new(table: Arc<Table>, fx: Effects, metrics: Arc<EnrolMetrics>) -> Self {
        Self {
            table,
            netns: fx.netns,
            rules: fx.rules,
            ztunnel: std::sync::OnceLock::new(),
            probes: fx.probes,
            status: fx.status,
            store: fx.store,
            zds_timeout: Duration::from_secs(4),
            locks: Mutex::new(HashMap::new()),
            metrics,
            verify_requests: std::sync::OnceLock::new(),
        }
    }

    /// The enroller's metrics (the controller times an ADD's lookup into them).
    pub fn metrics(&self) -> &Arc<EnrolMetrics> {
        &self.metrics
    }

    /// Samples live state into the gauges (run before each scrape).
    pub fn sample_metrics(&self) {
        self.metrics.set_ztunnels(self.ztunnels());
        let (enabled, pending, failed) = pod_states(&self.table);
        self.metrics.set_pods(enabled, pending, failed);
    }

    /// Hands the enroller its ztunnel side (the ZDS server), once state is rebuilt
    /// (before that, a connecting ztunnel would get an empty snapshot and drain every pod).
    pub fn set_ztunnel(&self, ztunnel: Arc<dyn Ztunnel>) {
        let _ = self.ztunnel.set(ztunnel);
    }

    /// Number of connected ztunnels.
    pub fn ztunnels(&self) -> usize {
        self.ztunnel.get().map_or(0, |z| z.connections())
    }

    /// The in-pod rules (CHECK, status and doctor read them).
    pub fn rules(&self) -> &Arc<dyn PodRules> {
        &self.rules
    }

    /// The host probe set.
    pub fn probes(&self) -> &Arc<dyn ProbeSet> {
        &self.probes
    }

    /// The pod status writer (annotation, Events).
    pub fn status(&self) -> &Arc<dyn StatusWriter> {
        &self.status
    }

    /// The pod's lock if no ADD/DEL holds it: the drift verifier yields to them.
    pub fn try_pod_lock(&self, uid: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.pod_lock(uid).try_lock_owned().ok()
    }

    /// Opens the netns at `path` as an ADD would (the host's refused).
    pub async fn open_netns(&self, path: PathBuf) -> Result<Netns, String> {
        let finder = self.netns.clone();
        tokio::task::spawn_blocking(move || finder.open(&path).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Saves a pod's netns record (after its netns changed).
    pub fn save_record(&self, rec: &Record) -> std::io::Result<()> {
        self.store.save(rec)
    }

    /// Where "verify now" requests go (set once, by the drift verifier when it is on).
    pub fn set_verify_requests(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.verify_requests.set(tx);
    }

    /// Asks the drift verifier to check pod `uid` at once (no-op when it is off).
    pub fn request_verify(&self, uid: &str) {
        if let Some(tx) = self.verify_requests.get() {
            let _ = tx.send(uid.to_owned());
        }
    }

    fn pod_lock(&self, uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Drop locks nobody holds, so the map does not grow with pod churn.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(uid.to_owned()).or_default().clone()
    }

    /// Opens the pod's netns: the given path, else the held one, else a /proc scan.
    async fn netns_for(&self, req: &Request) -> Result<(Arc<Netns>, String), EnrollError> {
        let err = |msg: String| EnrollError::Netns {
            pod: req.id.clone(),
            msg,
        };
        if let Some(path) = &req.netns_path {
            let (finder, p) = (self.netns.clone(), PathBuf::from(path));
            let ns = tokio::task::spawn_blocking(move || finder.open(&p))
                .await
                .map_err(|e| err(e.to_string()))?
                .map_err(|e| err(e.to_string()))?;
            // Keep the fd already held when it is the same netns (ztunnel sees no change).
            if let Some(held) = self.table.get(&req.id.uid).and_then(|h| h.netns) {
                if held.id() == ns.id() {
                    return Ok((held, path.clone()));
                }
            }
            return Ok((Arc::new(ns), path.clone()));
        }
        if let Some(h) = self.table.get(&req.id.uid) {
            if let (Some(ns), Some(p)) = (h.netns, h.netns_path) {
                return Ok((ns, p));
            }
        }
        let wanted = HashMap::from([(req.id.uid.clone(), req.ips.clone())]);
        let finder = self.netns.clone();
        let mut found = tokio::task::spawn_blocking(move || finder.scan(&wanted))
            .await
            .map_err(|e| err(e.to_string()))?;
        let ns = found
            .remove(&req.id.uid)
            .ok_or_else(|| err("no process of this pod found in the host's /proc".into()))?;
        let label = ns.label().to_owned();
        Ok((Arc::new(ns), label))
    }

    /// Puts a pod in the mesh; on success it is held `Enabled`.
    pub async fn add(&self, req: Request) -> Result<(), EnrollError> {
        let span = info_span!("enroll", namespace = %req.id.namespace, pod = %req.id.name, uid = %req.id.uid);
        let result = async {
            let lock = self.pod_lock(&req.id.uid);
            let _guard = lock.lock().await;
            let t = Instant::now();
            let (netns, path) = self.netns_for(&req).await?;
            self.metrics.add_phase(AddPhase::Netns, t.elapsed());
            let t = Instant::now();
            self.apply_rules(&req.id, &netns, &req.cfg).await?;
            self.metrics.add_phase(AddPhase::Rules, t.elapsed());
            let t = Instant::now();
            // Held (pending) before the add, so a snapshot racing with it includes the pod.
            self.table.put(Held {
                id: req.id.clone(),
                service_account: req.service_account.clone(),
                netns: Some(netns.clone()),
                netns_path: Some(path.clone()),
                cfg: req.cfg.clone(),
                ips: req.ips.clone(),
                container_id: req.container_id.clone(),
                phase: Phase::Pending,
                last_error: None,
                since: SystemTime::now(),
            });
            let rec = Record::new(&req.id, path, netns.id().ino, req.container_id.clone());
            if let Err(e) = self.store.save(&rec) {
                warn!(error = %e, "cannot record the pod's netns (a restart will scan /proc for it)");
            }
            self.metrics.add_phase(AddPhase::Record, t.elapsed());
            self.announce_timed(&req.id, true).await
        }
        .instrument(span)
        .await;
        self.metrics.enrolment(enrolment_result(&result));
        result
    }

    /// The periodic retry of a pending pod: under the pod's lock, and only if it is still
    /// pending then (an ADD in flight holds the lock while it waits for ztunnel's ack, so the
    /// retry never sends ztunnel a second AddWorkload for the same pod).
    pub async fn announce_if_pending(&self, id: &PodId) -> Result<(), EnrollError> {
        let lock = self.pod_lock(&id.uid);
        let _guard = lock.lock().await;
        match self.table.get(&id.uid) {
            Some(h) if h.phase == Phase::Pending && h.netns.is_some() => {
                self.announce_timed(id, false).await
            }
            _ => Ok(()),
        }
    }

    /// Tells ztunnel about a held pod and finishes its enrolment; the pod stays
    /// pending on failure (retried later).
    pub async fn announce(&self, id: &PodId) -> Result<(), EnrollError> {
        self.announce_timed(id, false).await
    }

    /// [`Enroller::announce`]; `timed`: an ADD's, whose phases go to the ADD histogram.
    async fn announce_timed(&self, id: &PodId, timed: bool) -> Result<(), EnrollError> {
        let phase = |p: AddPhase, t: Instant| {
            if timed {
                self.metrics.add_phase(p, t.elapsed());
            }
        };
        let Some(held) = self.table.get(&id.uid) else {
            return Ok(());
        };
        let Some(netns) = held.netns.clone() else {
            return Err(EnrollError::Netns {
                pod: id.clone(),
                msg: "netns unknown".into(),
            });
        };
        let t = Instant::now();
        let failure = match self.ztunnel.get() {
            None => Some("no ztunnel connection (ZDS socket not open yet)".to_owned()),
            Some(zds) => {
                let sent = tokio::time::timeout(
                    self.zds_timeout,
                    zds.add_workload(&id.uid, held.workload_info(), &netns),
                )
                .await;
                match sent {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no ack within {:?}", self.zds_timeout)),
                }
            }
        };
        phase(AddPhase::Ztunnel, t);
        if let Some(msg) = failure {
            self.table.update(&id.uid, |h| {
                h.last_error = Some(msg.clone());
            });
            let _ = self.status.set(id, Some(Phase::Pending.as_str())).await;
            let _ = self.status.event(id, "EnrollmentFailed", &msg).await;
            warn!(error = %msg, "ztunnel did not take the pod; it stays pending");
            return Err(EnrollError::Ztunnel {
                pod: id.clone(),
                msg,
            });
        }
        let t = Instant::now();
        if let Err(e) = self.probes.upsert(&id.uid, &held.ips) {
            warn!(error = %e, "cannot add the pod's IPs to the host probe set");
        }
        phase(AddPhase::Probes, t);
        self.table.update(&id.uid, |h| {
            h.phase = Phase::Enabled;
            h.last_error = None;
            h.since = SystemTime::now();
        });
        let t = Instant::now();
        if let Err(e) = self.status.set(id, Some(Phase::Enabled.as_str())).await {
            warn!(error = %e, "cannot annotate the pod");
        }
        phase(AddPhase::Status, t);
        info!("pod enrolled");
        Ok(())
    }

    async fn apply_rules(
        &self,
        id: &PodId,
        netns: &Arc<Netns>,
        cfg: &InpodConfig,
    ) -> Result<(), EnrollError> {
        let (r, ns, c) = (self.rules.clone(), netns.clone(), cfg.clone());
        let started = Instant::now();
        let res = tokio::task::spawn_blocking(move || r.apply(&ns, &c))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|msg| EnrollError::Rules {
                pod: id.clone(),
                msg,
            });
        if res.is_ok() {
            self.metrics
                .rules_apply(self.rules.backend(), started.elapsed());
        }
        res
    }

    /// Takes a pod out of the mesh. `deleted`: the pod (and its netns) is going
    /// away, so its rules are left to die with it.
    pub async fn remove(&self, id: &PodId, deleted: bool) -> Result<(), EnrollError> {
        self.remove_if(id, deleted, |_| true).await.map(|_| ())
    }

    /// The runtime's DEL (or GC) of sandbox `container_id`: releases the pod only when
    /// that sandbox is the one held (see [`sandbox_matches`]), so a late DEL of a
    /// replaced sandbox cannot release its running successor. Returns whether it released.
    pub async fn release_sandbox(
        &self,
        id: &PodId,
        container_id: &str,
    ) -> Result<bool, EnrollError> {
        self.remove_if(id, true, |h| {
            let matches = sandbox_matches(h.container_id.as_deref(), container_id);
            if !matches {
                info!(
                    sandbox = container_id,
                    held = h.container_id.as_deref().unwrap_or_default(),
                    "DEL of a sandbox that is not the held one: ignored"
                );
            }
            matches
        })
        .await
    }

    /// Releases a held pod if `wanted` says so; checked under the pod's lock, so an
    /// ADD that replaces the sandbox meanwhile is seen.
    async fn remove_if(
        &self,
        id: &PodId,
        deleted: bool,
        wanted: impl FnOnce(&Held) -> bool,
    ) -> Result<bool, EnrollError> {
        let span = info_span!("release", namespace = %id.namespace, pod = %id.name, uid = %id.uid);
        async {
            let lock = self.pod_lock(&id.uid);
            let _guard = lock.lock().await;
            let Some(current) = self.table.get(&id.uid) else {
                return Ok(false);
            };
            if !wanted(&current) {
                return Ok(false);
            }
            let Some(held) = self.table.take(&id.uid) else {
                return Ok(false);
            };
            if let Err(e) = self.probes.remove(&id.uid) {
                warn!(error = %e, "cannot remove the pod's IPs from the host probe set");
            }
            if !deleted {
                if let Some(ns) = held.netns.clone() {
                    let (r, cfg) = (self.rules.clone(), held.cfg.clone());
                    let res = tokio::task::spawn_blocking(move || r.remove(&ns, &cfg))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r);
                    if let Err(msg) = res {
                        // Keep holding it so the removal is retried.
                        self.table.put(held);
                        return Err(EnrollError::Rules { pod: id.clone(), msg });
                    }
                }
            }
            if let Some(zds) = self.ztunnel.get() {
                if let Err(e) = zds.del_workload(&id.uid).await {
                    warn!(error = %e, "ztunnel did not ack DelWorkload (it drains the pod on its next snapshot)");
                }
            }
            self.store.remove(&id.uid);
            if let Err(e) = self.status.set(id, None).await {
                warn!(error = %e, "cannot remove the pod's annotation");
            }
            info!(deleted, "pod released");
            Ok(true)
        }
        .instrument(span)
        .await
    }

    /// Makes the host probe set hold exactly the held pods' IPs (after a restart).
    pub fn resync_probes(&self) {
        let held: Vec<(String, Vec<IpAddr>)> = self
            .table
            .all()
            .into_iter()
            .map(|h| (h.id.uid, h.ips))
            .collect();
        if let Err(e) = self.probes.resync(&held) {
            warn!(error = %e, "cannot resync the host probe set");
        }
    }

    /// Re-applies rules for a held pod (reconciliation); idempotent.
    pub async fn reapply(&self, held: &Held) -> Result<(), EnrollError> {
        match &held.netns {
            Some(ns) => self.apply_rules(&held.id, ns, &held.cfg).await,
            None => Ok(()),
        }
    }

    // ---- the narrow API of the restart rebuild (mesh/rebuild.rs) ----

    /// Every netns record on disk.
    pub async fn records(&self) -> Vec<Record> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.load_all())
            .await
            .unwrap_or_default()
    }

    /// Opens the recorded netns of each record whose path still holds the recorded
    /// netns (same inode): uid → (netns, path). Gone or reused paths are skipped.
    pub async fn open_recorded(
        &self,
        records: Vec<Record>,
    ) -> HashMap<String, (Arc<Netns>, String)> {
        let finder = self.netns.clone();
        tokio::task::spawn_blocking(move || open_records(finder.as_ref(), &records))
            .await
            .unwrap_or_default()
    }

    /// Scans the host for the processes of these pods (uid → IPs): uid → netns.
    pub async fn scan(&self, wanted: HashMap<String, Vec<IpAddr>>) -> HashMap<String, Arc<Netns>> {
        if wanted.is_empty() {
            return HashMap::new();
        }
        let finder = self.netns.clone();
        tokio::task::spawn_blocking(move || finder.scan(&wanted))
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(uid, ns)| (uid, Arc::new(ns)))
            .collect()
    }

    /// Holds a pod found again after a restart (its rules are re-applied after the
    /// snapshot: [`Enroller::reapply_held`]).
    pub fn restore(&self, held: Held) {
        self.table.put(held);
    }

    /// The UIDs of every held pod.
    pub fn held_uids(&self) -> Vec<String> {
        self.table.all().into_iter().map(|h| h.id.uid).collect()
    }

    /// Re-applies the rules of held pod `uid` under its lock (nothing when it is no longer
    /// held or has no netns).
    pub async fn reapply_held(&self, uid: &str) -> Result<(), EnrollError> {
        let lock = self.pod_lock(uid);
        let _guard = lock.lock().await;
        match self.table.get(uid) {
            Some(held) => self.reapply(&held).await,
            None => Ok(()),
        }
    }

    /// Whether pod `uid` is held.
    pub fn holds(&self, uid: &str) -> bool {
        self.table.get(uid).is_some()
    }

    /// Number of held pods.
    pub fn held_count(&self) -> usize {
        self.table.all().len()
    }

    /// A pod released while the agent was down: its rules come out of its recorded
    /// netns (when that is still there) with `cfg`.
    pub async fn remove_recorded_rules(&self, rec: &Record, cfg: &InpodConfig) {
        let (finder, rules, cfg, one) = (
            self.netns.clone(),
            self.rules.clone(),
            cfg.clone(),
            vec![rec.clone()],
        );
        let _ = tokio::task::spawn_blocking(move || {
            if let Some((ns, _)) = open_records(finder.as_ref(), &one).into_values().next() {
                if let Err(e) = rules.remove(&ns, &cfg) {
                    warn!(netns = %ns.label(), error = %e, "cannot remove the rules of a released pod");
                }
            }
        })
        .await;
    }

    /// Forgets pod `uid`'s record.
    pub fn forget_record(&self, uid: &str) {
        self.store.remove(uid);
    }
}

/// Opens the recorded netns of each record whose path still holds the recorded
/// netns (blocking). Bad paths are logged and skipped.
fn open_records(
    finder: &dyn NetnsFinder,
    records: &[Record],
) -> HashMap<String, (Arc<Netns>, String)> {
    let mut out = HashMap::new();
    for rec in records {
        match finder.open(std::path::Path::new(&rec.netns_path)) {
            Ok(ns) if ns.id().ino == rec.netns_inode => {
                out.insert(rec.uid.clone(), (Arc::new(ns), rec.netns_path.clone()));
            }
            Ok(_) => debug!(uid = %rec.uid, "recorded netns path now holds another netns"),
            Err(NetnsError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                debug!(uid = %rec.uid, "recorded netns gone");
            }
            Err(e) => warn!(uid = %rec.uid, error = %e, "recorded netns unusable"),
        }
    }
    out
}

#[cfg(test)]
#[path = "enroller_tests.rs"]
mod tests;
