//! The agent's control loop: keeps the pod/namespace cache from a pod source,
//! decides with the policy, drives the enroller, reconciles after a restart,
//! retries pending pods, and answers the plugin.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambient_cni_api::plugin as pb;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, info, warn};

use super::enroller::{EnrollError, Enroller, Request};
use super::metrics::ReconcileMetrics;
use super::table::{Held, Phase};
use crate::plugin_server::PodHandler;
use crate::pods::source::{Found, PodSource, SourceEvent};
use crate::pods::{self, PodId};
use crate::policy::Policy;

/// How long a plugin ADD waits for the pod to show up in the cache before a direct lookup.
const CACHE_WAIT: Duration = Duration::from_millis(500);
/// Retry backoff for a pod's failed enrolment: first and largest delay.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Cache {
    pods: HashMap<String, Arc<Pod>>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
}

/// The controller (shared by the event loop and the plugin handler).
pub struct Controller {
    policy: Policy,
    enroller: Arc<Enroller>,
    source: Arc<dyn PodSource>,
    cache: Mutex<Cache>,
    changed: Notify,
    ready: AtomicBool,
    retries: Mutex<HashMap<String, Retry>>,
    /// Retry timers alive (sleeping or reconciling), for tests and metrics.
    retry_timers: Arc<AtomicUsize>,
    metrics: Arc<ReconcileMetrics>,
}

/// One pod's retry state: its backoff, and whether its one timer is scheduled.
#[derive(Debug, Clone, Copy)]
struct Retry {
    delay: Duration,
    scheduled: bool,
}

fn ip_list(strs: &[String]) -> Vec<IpAddr> {
    strs.iter()
        .filter_map(|s| s.split('/').next().and_then(|a| a.parse().ok()))
        .collect()
}

impl Controller {
    /// A controller; call [`Controller::start`] to run it.
    pub fn new(
        policy: Policy,
        enroller: Arc<Enroller>,
        source: Arc<dyn PodSource>,
        metrics: Arc<ReconcileMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy,
            enroller,
            source,
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            ready: AtomicBool::new(false),
            retries: Mutex::new(HashMap::new()),
            retry_timers: Arc::new(AtomicUsize::new(0)),
            metrics,
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the first reconciliation is done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The enroller.
    pub fn enroller(&self) -> &Arc<Enroller> {
        &self.enroller
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The decisions file's content for the current cache (see [`crate::decisions`]).
    pub fn decisions(&self, now_s: u64) -> ambient_cni_api::decisions::Decisions {
        let c = self.cache();
        crate::decisions::compute(
            &self.policy,
            c.pods.values().map(|p| p.as_ref()),
            &c.namespaces,
            now_s,
        )
    }

    /// Notified on every pod or namespace event.
    pub fn changes(&self) -> &Notify {
        &self.changed
    }

    /// The cached pod `ns/name` and its namespace's labels.
    pub fn cached(&self, namespace: &str, name: &str) -> Option<Found> {
        let c = self.cache();
        c.pods
            .values()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .map(|p| Found {
                pod: p.clone(),
                namespace_labels: c.namespaces.get(namespace).cloned().unwrap_or_default(),
            })
    }

    /// Runs the source, waits for its first sync, reconciles, opens the ZDS socket
    /// at `zds_path` with `zds_cfg` (only now, so the first snapshot is complete),
    /// then serves events.
    pub async fn start(
        self: Arc<Self>,
        zds_path: std::path::PathBuf,
        zds_cfg: crate::inpod::zds::config::ZdsConfig,
    ) -> Result<(), crate::inpod::zds::error::ZdsError> {
        let (tx, mut rx) = mpsc::channel(1024);
        tokio::spawn(self.source.clone().run(tx));
        // Fill the cache up to the first sync.
        while let Some(ev) = rx.recv().await {
            if matches!(ev, SourceEvent::Synced) {
                break;
            }
            self.absorb(&ev);
        }
        self.reconcile_after_start().await;
        let table: Arc<dyn crate::inpod::zds::snapshot::SnapshotSource> =
            self.enroller.table.clone();
        let zds = crate::inpod::zds::server::ZdsServer::bind_with(&zds_path, table, zds_cfg)?;
        self.enroller.set_zds(Arc::new(zds));
        self.ready.store(true, Ordering::Release);
        info!("agent ready");
        tokio::spawn(self.clone().retry_pending_loop());
        while let Some(ev) = rx.recv().await {
            self.clone().handle(ev);
        }
        warn!("pod source ended");
        Ok(())
    }

    /// Updates the cache; returns the namespace labels before, for namespace events.
    fn absorb(&self, ev: &SourceEvent) -> Option<BTreeMap<String, String>> {
        let mut c = self.cache();
        let old = match ev {
            SourceEvent::Pod(p) => {
                c.pods.insert(pods::pod_id(p).uid, p.clone());
                None
            }
            SourceEvent::PodDeleted(p) => {
                c.pods.remove(&pods::pod_id(p).uid);
                None
            }
            SourceEvent::Namespace { name, labels } => {
                c.namespaces.insert(name.clone(), labels.clone())
            }
            SourceEvent::Synced => None,
        };
        drop(c);
        self.changed.notify_waiters();
        old
    }

    fn handle(self: Arc<Self>, ev: SourceEvent) {
        let kind = match &ev {
            SourceEvent::Pod(p) if self.cache().pods.contains_key(&pods::pod_id(p).uid) => {
                Some("update")
            }
            SourceEvent::Pod(_) => Some("add"),
            SourceEvent::PodDeleted(_) => Some("delete"),
            SourceEvent::Namespace { .. } => Some("namespace"),
            SourceEvent::Synced => None,
        };
        if let Some(kind) = kind {
            self.metrics.event(kind);
        }
        let old_labels = self.absorb(&ev);
        match ev {
            SourceEvent::Pod(p) => {
                let uid = pods::pod_id(&p).uid;
                tokio::spawn(async move { self.reconcile_pod(&uid).await });
            }
            SourceEvent::PodDeleted(p) => {
                let id = pods::pod_id(&p);
                // Its retry timer, if any, ends when it wakes.
                self.retries().remove(&id.uid);
                tokio::spawn(async move {
                    if let Err(e) = self.enroller.remove(&id, true).await {
                        warn!(pod = %id, error = %e, "release of a deleted pod failed");
                    }
                });
            }
            SourceEvent::Namespace { name, labels } => {
                let old = old_labels.unwrap_or_default();
                if !self.policy.namespace_matters(&old, &labels) {
                    return;
                }
                info!(namespace = %name, "namespace enrolment changed; re-evaluating its pods");
                let uids: Vec<String> = self
                    .cache()
                    .pods
                    .values()
                    .filter(|p| p.metadata.namespace.as_deref() == Some(name.as_str()))
                    .map(|p| pods::pod_id(p).uid)
                    .collect();
                for uid in uids {
                    let me = self.clone();
                    tokio::spawn(async move { me.reconcile_pod(&uid).await });
                }
            }
            SourceEvent::Synced => {}
        }
    }

    /// Brings one pod to what the policy says, from the latest cached object
    /// (level-triggered: order of events does not matter).
    pub async fn reconcile_pod(self: &Arc<Self>, uid: &str) {
        let (pod, ns_labels) = {
            let c = self.cache();
            let Some(pod) = c.pods.get(uid).cloned() else {
                drop(c);
                self.retries().remove(uid);
                return;
            };
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            (
                pod.clone(),
                c.namespaces.get(&ns).cloned().unwrap_or_default(),
            )
        };
        let id = pods::pod_id(&pod);
        let held = self.enroller.table.get(uid);
        let verdict = self.policy.evaluate(&pod, &ns_labels);
        let result = match (&held, verdict) {
            (Some(_), Err(skip)) => {
                info!(pod = %id, reason = %skip, "pod leaves the mesh");
                self.enroller.remove(&id, pods::is_terminal(&pod)).await
            }
            (Some(h), Ok(())) => {
                let ips = pods::ips(&pod);
                if !ips.is_empty() && ips != h.ips {
                    // The probe set follows the pod's current IPs.
                    self.enroller.table.update(uid, |h| h.ips = ips);
                }
                Ok(())
            }
            (None, Ok(())) => {
                let ips = pods::ips(&pod);
                if ips.is_empty() {
                    // Not started yet: its CNI ADD will enrol it.
                    self.retries().remove(uid);
                    return;
                }
                info!(pod = %id, "running pod joins the mesh (no CNI event)");
                let (cfg, warnings) = self.policy.inpod_config(&pod);
                for w in warnings {
                    warn!(pod = %id, "{w}");
                }
                self.enroller
                    .add(Request {
                        id: id.clone(),
                        service_account: pods::service_account(&pod),
                        netns_path: None,
                        ips,
                        cfg,
                        container_id: None,
                    })
                    .await
            }
            (None, Err(_)) => Ok(()),
        };
        match result {
            Ok(()) => {
                self.retries().remove(uid);
            }
            Err(e) if e.is_retryable() || matches!(e, EnrollError::Netns { .. }) => {
                warn!(pod = %id, error = %e, "will retry");
                self.retry_later(uid.to_owned());
            }
            Err(e) => warn!(pod = %id, error = %e, "enrolment failed"),
        }
    }

    fn retries(&self) -> MutexGuard<'_, HashMap<String, Retry>> {
        self.retries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pods with retry state (a pending retry or a backoff to continue from).
    pub fn retrying_pods(&self) -> usize {
        self.retries().len()
    }

    /// Retry timers alive right now (at most one per pod).
    pub fn retry_timers(&self) -> usize {
        self.retry_timers.load(Ordering::Acquire)
    }

    /// Schedules a retry of a pod with per-pod exponential backoff. At most one timer
    /// per pod: while one is scheduled, more failures (e.g. one per pod update) add
    /// nothing, since the timer reconciles from the latest cached object anyway.
    fn retry_later(self: &Arc<Self>, uid: String) {
        let delay = {
            let mut r = self.retries();
            let e = r.entry(uid.clone()).or_insert(Retry {
                delay: Duration::ZERO,
                scheduled: false,
            });
            if e.scheduled {
                return;
            }
            e.delay = if e.delay.is_zero() {
                RETRY_MIN
            } else {
                (e.delay * 2).min(RETRY_MAX)
            };
            e.scheduled = true;
            e.delay
        };
        let me = self.clone();
        let timers = self.retry_timers.clone();
        timers.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            timers.fetch_sub(1, Ordering::AcqRel);
            // Gone (pod deleted, or enrolled meanwhile): the chain ends here.
            let live = me
                .retries()
                .get_mut(&uid)
                .map(|e| e.scheduled = false)
                .is_some();
            if live {
                me.reconcile_pod(&uid).await;
            }
        });
    }

    /// Every second: held pods that no ztunnel has acked yet are announced again.
    async fn retry_pending_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if self.enroller.ztunnels() == 0 {
                continue;
            }
            for h in self.enroller.table.all() {
                if h.phase == Phase::Pending && h.netns.is_some() {
                    let _ = self.enroller.announce_if_pending(&h.id).await;
                }
            }
        }
    }

    /// After a (re)start: rebuild the held set from the pod source, the netns
    /// records and a /proc scan; re-apply rules where they drifted; drop pods
    /// deleted while the agent was down. ztunnel gets the result as its snapshot.
    async fn reconcile_after_start(&self) {
        let started = std::time::Instant::now();
        let store = self.enroller.store().clone();
        let records = tokio::task::spawn_blocking(move || store.load_all())
            .await
            .unwrap_or_default();
        let (wanted, pod_objs): (Vec<_>, HashMap<String, Arc<Pod>>) = {
            let c = self.cache();
            let mut wanted = Vec::new();
            let mut objs = HashMap::new();
            for p in c.pods.values() {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let labels = c.namespaces.get(&ns).cloned().unwrap_or_default();
                if self.policy.evaluate(p, &labels).is_ok() {
                    wanted.push(pods::pod_id(p));
                    objs.insert(pods::pod_id(p).uid, p.clone());
                }
            }
            (wanted, objs)
        };
        let host = self.enroller_host();
        // Opening is file I/O on paths from disk: off the runtime workers.
        let wanted_records: Vec<_> = records
            .iter()
            .filter(|r| pod_objs.contains_key(&r.uid))
            .cloned()
            .collect();
        let mut by_uid: HashMap<String, (Arc<iptables_rules::netns::Netns>, String)> =
            tokio::task::spawn_blocking(move || open_records(&wanted_records, host))
                .await
                .unwrap_or_default();
        // Pods with no usable record: look for their processes.
        let to_scan: HashMap<String, Vec<IpAddr>> = wanted
            .iter()
            .filter(|id| !by_uid.contains_key(&id.uid))
            .filter_map(|id| {
                let ips = pods::ips(pod_objs.get(&id.uid)?);
                (!ips.is_empty()).then(|| (id.uid.clone(), ips))
            })
            .collect();
        if !to_scan.is_empty() {
            let proc_dir = self.enroller_host_proc();
            let found = tokio::task::spawn_blocking(move || {
                crate::discovery::scan::scan_for_pods(&proc_dir, &to_scan, host)
            })
            .await
            .unwrap_or_default();
            for (uid, ns) in found {
                let label = ns.label().to_owned();
                by_uid.insert(uid, (Arc::new(ns), label));
            }
        }
        let mut reapplied = 0;
        for id in &wanted {
            let Some(pod) = pod_objs.get(&id.uid) else {
                continue;
            };
            let (cfg, _) = self.policy.inpod_config(pod);
            let netns = by_uid.get(&id.uid).cloned();
            let was_held = records.iter().any(|r| r.uid == id.uid);
            if netns.is_none() && !was_held {
                // Never enrolled and not found: a new pod whose CNI ADD is still to come.
                continue;
            }
            let held = Held {
                id: id.clone(),
                service_account: pods::service_account(pod),
                netns: netns.as_ref().map(|(n, _)| n.clone()),
                netns_path: netns.as_ref().map(|(_, p)| p.clone()),
                cfg,
                ips: pods::ips(pod),
                // The recorded sandbox, when its netns is the recorded one (else a scan found it).
                container_id: records
                    .iter()
                    .find(|r| r.uid == id.uid)
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
                since: std::time::SystemTime::now(),
            };
            if let Err(e) = self.enroller.reapply(&held).await {
                warn!(pod = %id, error = %e, "re-applying rules after restart failed");
            } else if held.netns.is_some() {
                reapplied += 1;
            }
            self.enroller.table.put(held);
        }
        // Records of pods that are gone or no longer selected.
        for rec in records {
            if self.enroller.table.get(&rec.uid).is_some() {
                continue;
            }
            let id = PodId {
                namespace: rec.namespace.clone(),
                name: rec.name.clone(),
                uid: rec.uid.clone(),
            };
            if pod_objs.contains_key(&rec.uid) || self.cache().pods.contains_key(&rec.uid) {
                // Still exists but left the mesh while we were down: take its rules out.
                let r = self.enroller.redirector().clone();
                let cfg = self.policy.inpod.clone();
                let one = vec![rec.clone()];
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some((ns, _)) = open_records(&one, host).into_values().next() {
                        let _ = r.remove(&ns, &cfg);
                    }
                })
                .await;
            }
            info!(pod = %id, "dropping a pod deleted or released while the agent was down");
            self.enroller.store().remove(&rec.uid);
        }
        self.enroller.resync_probes();
        self.metrics.reconcile(started.elapsed());
        info!(
            held = self.enroller.table.all().len(),
            reapplied,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state rebuilt after start"
        );
    }

    fn enroller_host(&self) -> iptables_rules::netns::NsId {
        self.enroller.host_netns()
    }

    fn enroller_host_proc(&self) -> std::path::PathBuf {
        self.enroller.host_proc().to_owned()
    }

    /// Looks a pod up for a plugin request: the cache, a short wait for the watch, then the source.
    async fn lookup(&self, namespace: &str, name: &str) -> Result<Found, Status> {
        if let Some(f) = self.cached(namespace, name) {
            return Ok(f);
        }
        let deadline = tokio::time::Instant::now() + CACHE_WAIT;
        loop {
            let notified = self.changed.notified();
            if let Some(f) = self.cached(namespace, name) {
                return Ok(f);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        match self.source.get(namespace, name).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(Status::unavailable(format!(
                "pod {namespace}/{name} is not known to the agent yet"
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "cannot look up pod {namespace}/{name}: {e}"
            ))),
        }
    }
}

/// Opens the recorded netns of each record whose path still holds the recorded
/// netns (blocking: call off the runtime workers). Bad paths are logged and skipped.
fn open_records(
    records: &[super::persist::Record],
    host: iptables_rules::netns::NsId,
) -> HashMap<String, (Arc<iptables_rules::netns::Netns>, String)> {
    let mut out = HashMap::new();
    for rec in records {
        let path = std::path::Path::new(&rec.netns_path);
        match iptables_rules::netns::Netns::open(path, Some(host)) {
            Ok(ns) if ns.id().ino == rec.netns_inode => {
                out.insert(rec.uid.clone(), (Arc::new(ns), rec.netns_path.clone()));
            }
            Ok(_) => debug!(uid = %rec.uid, "recorded netns path now holds another netns"),
            Err(iptables_rules::netns::NetnsError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                debug!(uid = %rec.uid, "recorded netns gone");
            }
            Err(e) => warn!(uid = %rec.uid, error = %e, "recorded netns unusable"),
        }
    }
    out
}

impl Controller {
    /// The held pod a plugin request names: by UID when it carries one, else by name.
    fn held_for(&self, pref: &pb::PodRef) -> Option<Held> {
        if pref.uid.is_empty() {
            self.enroller.table.find(&pref.namespace, &pref.name)
        } else {
            self.enroller.table.get(&pref.uid)
        }
    }
}

fn pod_of(req: Option<&pb::PodRef>) -> Result<&pb::PodRef, Status> {
    req.filter(|p| !p.namespace.is_empty() && !p.name.is_empty())
        .ok_or_else(|| Status::invalid_argument("request names no pod"))
}

#[tonic::async_trait]
impl PodHandler for Controller {
    async fn add(&self, req: pb::AddRequest) -> Result<pb::Decision, Status> {
        if !self.is_ready() {
            return Err(Status::unavailable(
                "agent is starting (rebuilding its state)",
            ));
        }
        let pref = pod_of(req.pod.as_ref())?;
        let t = std::time::Instant::now();
        let found = self.lookup(&pref.namespace, &pref.name).await;
        self.enroller
            .metrics()
            .add_phase(super::metrics::AddPhase::Lookup, t.elapsed());
        let found = found?;
        if let Err(skip) = self.policy.evaluate(&found.pod, &found.namespace_labels) {
            debug!(namespace = %pref.namespace, pod = %pref.name, reason = %skip, "not in mesh");
            return Ok(pb::Decision::NotInMesh);
        }
        let (cfg, warnings) = self.policy.inpod_config(&found.pod);
        let id = pods::pod_id(&found.pod);
        for w in warnings {
            warn!(pod = %id, "{w}");
        }
        let ips = ip_list(&req.ips);
        let request = Request {
            id: id.clone(),
            service_account: pods::service_account(&found.pod),
            netns_path: Some(req.netns.clone()),
            ips: if ips.is_empty() {
                pods::ips(&found.pod)
            } else {
                ips
            },
            cfg,
            container_id: req.attachment.map(|a| a.container_id),
        };
        match self.enroller.add(request).await {
            Ok(()) => Ok(pb::Decision::Captured),
            Err(e @ EnrollError::Ztunnel { .. }) => Err(Status::unavailable(e.to_string())),
            Err(e @ EnrollError::Netns { .. }) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ EnrollError::Rules { .. }) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    async fn del(&self, req: pb::DelRequest) -> Result<(), Status> {
        let Some(pref) = req.pod.as_ref() else {
            return Ok(());
        };
        let Some(h) = self.held_for(pref) else {
            return Ok(());
        };
        // The sandbox is going away: its netns (and rules) with it. Keyed by container
        // ID: a late DEL of a replaced sandbox leaves its successor captured.
        let sandbox = req.attachment.map(|a| a.container_id).unwrap_or_default();
        self.enroller
            .release_sandbox(&h.id, &sandbox)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(())
    }

    async fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, Status> {
        let pref = pod_of(req.pod.as_ref())?;
        let ok = |message: &str| pb::CheckResponse {
            ok: true,
            message: message.into(),
        };
        let Some(h) = self.held_for(pref) else {
            return match self.cached(&pref.namespace, &pref.name) {
                Some(f) if self.policy.evaluate(&f.pod, &f.namespace_labels).is_ok() => {
                    Ok(pb::CheckResponse {
                        ok: false,
                        message: "pod should be captured but the agent does not hold it".into(),
                    })
                }
                _ => Ok(ok("not in mesh")),
            };
        };
        let sandbox = req.attachment.map(|a| a.container_id).unwrap_or_default();
        if !super::enroller::sandbox_matches(h.container_id.as_deref(), &sandbox) {
            return Ok(pb::CheckResponse {
                ok: false,
                message: format!(
                    "sandbox {sandbox} is not the one the agent holds for this pod ({})",
                    h.container_id.as_deref().unwrap_or_default()
                ),
            });
        }
        let Some(ns) = h.netns.clone() else {
            return Ok(pb::CheckResponse {
                ok: false,
                message: "pod netns unknown".into(),
            });
        };
        let r = self.enroller.redirector().clone();
        let cfg = h.cfg.clone();
        let report = tokio::task::spawn_blocking(move || r.show(&ns, &cfg))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(if report.complete && h.phase == Phase::Enabled {
            ok("captured")
        } else {
            pb::CheckResponse {
                ok: false,
                message: format!(
                    "rules complete: {}, phase: {}",
                    report.complete,
                    h.phase.as_str()
                ),
            }
        })
    }

    fn ready(&self) -> (bool, String) {
        // Not gated on ztunnel: a failing STATUS can stop every sandbox on the node,
        // ztunnel's own included. Mesh pods fail their ADD (retried) until it connects.
        if self.is_ready() {
            (true, String::new())
        } else {
            (false, "rebuilding state".into())
        }
    }

    async fn gc(&self, req: pb::GcRequest) -> Result<(), Status> {
        let valid: std::collections::HashSet<String> = req
            .valid_attachments
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        for h in self.enroller.table.all() {
            if let Some(cid) = &h.container_id {
                if !valid.contains(cid) {
                    info!(pod = %h.id, "GC: sandbox no longer valid");
                    // Under the pod's lock: an ADD that replaced the sandbox meanwhile wins.
                    let _ = self.enroller.release_sandbox(&h.id, cid).await;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::enroller::Effects;
    use crate::mesh::hooks::{NoProbeSet, NoStatus};
    use crate::mesh::persist::Store;
    use crate::mesh::table::Table;
    use iptables_rules::backend::{BackendKind, Installed, RulesBackend};
    use iptables_rules::config::InpodConfig;
    use iptables_rules::error::RulesError;
    use iptables_rules::redirector::Redirector;
    use serde_json::json;

    /// Rules are never reached: the pod's netns is never found.
    struct NoRules;
    impl RulesBackend for NoRules {
        fn kind(&self) -> BackendKind {
            BackendKind::Nftables
        }
        fn apply(&self, _: &InpodConfig) -> Result<(), RulesError> {
            unreachable!("no netns, no rules")
        }
        fn remove(&self, _: &InpodConfig) -> Result<(), RulesError> {
            unreachable!("no netns, no rules")
        }
        fn installed(&self, _: &InpodConfig) -> Result<Installed, RulesError> {
            unreachable!("no netns, no rules")
        }
    }

    struct NoSource;
    #[tonic::async_trait]
    impl PodSource for NoSource {
        fn name(&self) -> &'static str {
            "none"
        }
        async fn run(self: Arc<Self>, _: mpsc::Sender<SourceEvent>) {}
        async fn get(&self, _: &str, _: &str) -> Result<Option<Found>, String> {
            Ok(None)
        }
    }

    fn pod(version: usize) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": "mesh", "name": "web", "uid": "u-web",
                             "resourceVersion": version.to_string()},
                "spec": {"containers": []},
                "status": {"phase": "Running", "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}]},
            }))
            .unwrap(),
        )
    }

    /// A mesh pod whose netns can never be found (an empty host /proc): every
    /// reconcile fails with a retryable error.
    fn controller(dir: &std::path::Path) -> Arc<Controller> {
        let proc_dir = dir.join("proc");
        std::fs::create_dir_all(&proc_dir).unwrap();
        let enroller = Enroller::new(
            Arc::new(Table::default()),
            Effects {
                redirector: Arc::new(Redirector::new(Box::new(NoRules))),
                probes: Arc::new(NoProbeSet),
                status: Arc::new(NoStatus),
                store: Store::open(dir.join("pods")).unwrap(),
            },
            proc_dir,
            iptables_rules::netns::NsId { dev: 0, ino: 0 },
            Arc::new(crate::mesh::metrics::EnrolMetrics::new(
                &mut Default::default(),
            )),
        );
        let ctl = Controller::new(
            Policy::default(),
            Arc::new(enroller),
            Arc::new(NoSource),
            Arc::new(ReconcileMetrics::new(&mut Default::default())),
        );
        ctl.absorb(&SourceEvent::Namespace {
            name: "mesh".into(),
            labels: [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into(),
        });
        ctl
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_to_an_unenrollable_pod_share_one_retry_timer() {
        let dir = std::env::temp_dir().join(format!("acni-retry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ctl = controller(&dir);
        for v in 0..100 {
            ctl.clone().handle(SourceEvent::Pod(pod(v)));
        }
        // Watch a few backoff rounds: never more than the one timer.
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut most = 0;
        while tokio::time::Instant::now() < until {
            most = most.max(ctl.retry_timers());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(most, 1, "one retry chain per pod");
        assert_eq!(ctl.retrying_pods(), 1);
        assert!(ctl.enroller.table.get("u-web").is_none());

        // Deleted: its state goes at once, its timer when it next wakes.
        ctl.clone().handle(SourceEvent::PodDeleted(pod(100)));
        assert_eq!(ctl.retrying_pods(), 0, "the retry map forgets deleted pods");
        let until = tokio::time::Instant::now() + RETRY_MAX + Duration::from_secs(1);
        while ctl.retry_timers() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ctl.retry_timers(), 0, "no chain outlives its pod");
        assert_eq!(ctl.retrying_pods(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
