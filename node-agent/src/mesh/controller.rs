//! The agent's control loop: keeps the pod/namespace cache from a pod source,
//! decides with the policy, drives the enroller, reconciles after a restart,
//! retries pending pods, and answers the plugin.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambient_cni_api::plugin as pb;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, info, warn};

use super::enroller::{EnrollError, Enroller, Request};
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
    retries: Mutex<HashMap<String, Duration>>,
}

fn ip_list(strs: &[String]) -> Vec<IpAddr> {
    strs.iter()
        .filter_map(|s| s.split('/').next().and_then(|a| a.parse().ok()))
        .collect()
}

impl Controller {
    /// A controller; call [`Controller::start`] to run it.
    pub fn new(policy: Policy, enroller: Arc<Enroller>, source: Arc<dyn PodSource>) -> Arc<Self> {
        Arc::new(Self {
            policy,
            enroller,
            source,
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            ready: AtomicBool::new(false),
            retries: Mutex::new(HashMap::new()),
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
    /// at `zds_path` (only now, so the first snapshot is complete), then serves events.
    pub async fn start(
        self: Arc<Self>,
        zds_path: std::path::PathBuf,
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
        let zds = crate::inpod::zds::server::ZdsServer::bind(&zds_path, table)?;
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
            crate::obs::metrics::global().reconcile_event(kind);
        }
        let old_labels = self.absorb(&ev);
        match ev {
            SourceEvent::Pod(p) => {
                let uid = pods::pod_id(&p).uid;
                tokio::spawn(async move { self.reconcile_pod(&uid).await });
            }
            SourceEvent::PodDeleted(p) => {
                let id = pods::pod_id(&p);
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
                return;
            }
            (None, Ok(())) => {
                let ips = pods::ips(&pod);
                if ips.is_empty() {
                    // Not started yet: its CNI ADD will enrol it.
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
            (None, Err(_)) => return,
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

    fn retries(&self) -> MutexGuard<'_, HashMap<String, Duration>> {
        self.retries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules one retry of a pod with per-pod exponential backoff (never a storm:
    /// at most one scheduled retry per pod).
    fn retry_later(self: &Arc<Self>, uid: String) {
        let delay = {
            let mut r = self.retries();
            let next = r.get(&uid).map_or(RETRY_MIN, |d| (*d * 2).min(RETRY_MAX));
            if r.insert(uid.clone(), next).is_some() && next == RETRY_MAX {
                // Already at the cap with one scheduled.
            }
            next
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.reconcile_pod(&uid).await;
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
                    let _ = self.enroller.announce(&h.id).await;
                }
            }
        }
    }

    /// After a (re)start: rebuild the held set from the pod source, the netns
    /// records and a /proc scan; re-apply rules where they drifted; drop pods
    /// deleted while the agent was down. ztunnel gets the result as its snapshot.
    async fn reconcile_after_start(&self) {
        let started = std::time::Instant::now();
        let records = self.enroller.store().load_all();
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
        let mut by_uid: HashMap<String, (Arc<iptables_rules::netns::Netns>, String)> =
            HashMap::new();
        for rec in &records {
            if !pod_objs.contains_key(&rec.uid) {
                continue;
            }
            let path = std::path::PathBuf::from(&rec.netns_path);
            match iptables_rules::netns::Netns::open(&path, Some(host)) {
                Ok(ns) if ns.id().ino == rec.netns_inode => {
                    by_uid.insert(rec.uid.clone(), (Arc::new(ns), rec.netns_path.clone()));
                }
                Ok(_) => debug!(uid = %rec.uid, "recorded netns path now holds another netns"),
                Err(e) => debug!(uid = %rec.uid, error = %e, "recorded netns gone"),
            }
        }
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
                container_id: None,
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
                if let Ok(ns) = iptables_rules::netns::Netns::open(
                    std::path::Path::new(&rec.netns_path),
                    Some(host),
                ) {
                    if ns.id().ino == rec.netns_inode {
                        let r = self.enroller.redirector().clone();
                        let cfg = self.policy.inpod.clone();
                        let _ = tokio::task::spawn_blocking(move || r.remove(&ns, &cfg)).await;
                    }
                }
            }
            info!(pod = %id, "dropping a pod deleted or released while the agent was down");
            self.enroller.store().remove(&rec.uid);
        }
        self.enroller.resync_probes();
        crate::obs::metrics::global().reconcile(started.elapsed());
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
        let found = self.lookup(&pref.namespace, &pref.name).await?;
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
        let held = if pref.uid.is_empty() {
            self.enroller.table.find(&pref.namespace, &pref.name)
        } else {
            self.enroller.table.get(&pref.uid)
        };
        if let Some(h) = held {
            // The sandbox is going away: its netns (and rules) with it.
            self.enroller
                .remove(&h.id, true)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(())
    }

    async fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, Status> {
        let pref = pod_of(req.pod.as_ref())?;
        let ok = |message: &str| pb::CheckResponse {
            ok: true,
            message: message.into(),
        };
        let Some(h) = self.enroller.table.find(&pref.namespace, &pref.name) else {
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
                    let _ = self.enroller.remove(&h.id, true).await;
                }
            }
        }
        Ok(())
    }
}
