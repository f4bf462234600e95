//! The agent's control loop: keeps the pod/namespace cache from a pod source,
//! decides with the policy, drives the enroller, reconciles after a restart,
//! retries pending pods, and answers the plugin.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ambient_cni_api::plugin as pb;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, info, warn};

use super::enroller::{EnrollError, Enroller, Request};
use super::metrics::ReconcileMetrics;
use super::policy::Policy;
use super::rebuild::{rebuild, Wanted};
use super::sidecar::{SidecarError, SidecarPath};
use super::sidecar_policy::{decide, Mode};
use super::table::{Held, Phase};
use crate::inpod::zds::server::ZdsServer;
use crate::plugin_server::PodHandler;
use crate::pods;
use crate::pods::source::{Found, PodSource, SourceEvent};

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
    /// The ZDS server once open (the agent shuts it down first at stop).
    zds: OnceLock<Arc<ZdsServer>>,
    /// Programs sidecar-injected pods at ADD (sidecar mode).
    sidecar: OnceLock<Arc<SidecarPath>>,
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
            zds: OnceLock::new(),
            sidecar: OnceLock::new(),
        })
    }

    /// Gives the controller its sidecar path (before [`Controller::start`]); without one,
    /// the ADD of a pod the policy wants in sidecar mode fails.
    pub fn set_sidecar(&self, path: Arc<SidecarPath>) {
        let _ = self.sidecar.set(path);
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

    /// The ZDS server, once open.
    pub fn zds(&self) -> Option<&Arc<ZdsServer>> {
        self.zds.get()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Reads the cache: `f` gets every cached pod and the labels of every namespace seen
    /// (the decisions file is computed from them).
    pub fn with_cache<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = &Pod>, &HashMap<String, BTreeMap<String, String>>) -> R,
    ) -> R {
        let c = self.cache();
        f(&mut c.pods.values().map(|p| p.as_ref()), &c.namespaces)
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
        let zds = Arc::new(ZdsServer::bind_with(&zds_path, table, zds_cfg)?);
        let _ = self.zds.set(zds.clone());
        self.enroller.set_ztunnel(zds);
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

    /// After a (re)start: rebuilds the held set (see [`super::rebuild`]) from what the
    /// pod source says is in the mesh now.
    async fn reconcile_after_start(&self) {
        let started = std::time::Instant::now();
        let (wanted, existing) = {
            let c = self.cache();
            let mut wanted = Vec::new();
            for p in c.pods.values() {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                let labels = c.namespaces.get(&ns).cloned().unwrap_or_default();
                if self.policy.evaluate(p, &labels).is_ok() {
                    wanted.push(Wanted {
                        id: pods::pod_id(p),
                        service_account: pods::service_account(p),
                        ips: pods::ips(p),
                        cfg: self.policy.inpod_config(p).0,
                    });
                }
            }
            let existing: HashSet<String> = c.pods.keys().cloned().collect();
            (wanted, existing)
        };
        let done = rebuild(&self.enroller, &wanted, &existing, &self.policy.inpod).await;
        self.metrics.reconcile(started.elapsed());
        info!(
            held = done.held,
            reapplied = done.reapplied,
            dropped = done.dropped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state rebuilt after start"
        );
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

impl Controller {
    /// A sidecar pod's ADD: programmed now (see [`super::sidecar`]), never held.
    async fn add_sidecar(&self, pod: &Pod, req: &pb::AddRequest) -> Result<pb::Decision, Status> {
        let Some(path) = self.sidecar.get() else {
            return Err(Status::failed_precondition(format!(
                "pod {}: sidecar mode is on but this agent cannot program sidecar pods",
                pods::pod_id(pod)
            )));
        };
        match path.add(pod, &req.netns, &ip_list(&req.ips)).await {
            Ok(_) => Ok(pb::Decision::Sidecar),
            Err(e @ (SidecarError::Invalid(_) | SidecarError::Netns { .. })) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ SidecarError::Rules { .. }) => Err(Status::failed_precondition(e.to_string())),
        }
    }

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
        match decide(&self.policy, &found.pod, &found.namespace_labels) {
            Mode::Ambient => {}
            Mode::Sidecar => return self.add_sidecar(&found.pod, &req).await,
            Mode::PassThrough(why) => {
                debug!(namespace = %pref.namespace, pod = %pref.name, reason = %why, "not in mesh");
                return Ok(pb::Decision::NotInMesh);
            }
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
        let r = self.enroller.rules().clone();
        let cfg = h.cfg.clone();
        let report = tokio::task::spawn_blocking(move || r.show(&ns, &cfg))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::unavailable)?;
        if !report.complete {
            // A failed CHECK is a drift signal: verify (and repair) this pod now.
            self.enroller.request_verify(&h.id.uid);
        }
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
#[path = "controller_tests.rs"]
mod tests;
