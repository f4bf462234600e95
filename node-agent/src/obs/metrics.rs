//! The agent's Prometheus metrics (`:15014/metrics`, OpenMetrics text).
//!
//! Names Istio's dashboards already use are kept; ours
//! are `ambient_cni_*`. Label values are `&'static str` from a fixed vocabulary,
//! so no pod-supplied string can grow the series count.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use ambient_cni_api::plugin as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::http::{self, Handler, HttpError, Reply};
use crate::mesh::enroller::{EnrollError, Enroller};
use crate::mesh::table::{Phase, Table};

/// The content type of the OpenMetrics text format (Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Plugin results (`result` label of `ambient_cni_plugin_requests_total`).
pub mod result {
    /// ADD: the pod was captured.
    pub const CAPTURED: &str = "captured";
    /// ADD: the pod is not in the mesh.
    pub const NOT_IN_MESH: &str = "not_in_mesh";
    /// DEL, CHECK (in place), STATUS (ready), GC: done.
    pub const OK: &str = "ok";
    /// CHECK found missing redirection, STATUS not ready.
    pub const NOT_OK: &str = "not_ok";
    /// Retryable: agent starting, ztunnel not there (the plugin's code 11).
    pub const UNAVAILABLE: &str = "unavailable";
    /// The agent refused the pod (bad netns, rules failed, bad request).
    pub const REFUSED: &str = "refused";
    /// Anything else.
    pub const ERROR: &str = "error";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    command: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseCode {
    response_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

/// Every `result` of [`enrolment_result`].
const ENROLMENT_RESULTS: [&str; 4] = ["enabled", "pending", "netns_error", "rules_error"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds; plugin ADD is budgeted at `timeout_ms` (5 s by default).
const ADD_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds; one netns entry plus a restore batch or a netlink transaction.
const RULES_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Seconds; a full reconciliation of every held pod.
const RECONCILE_BUCKETS: [f64; 10] = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

fn rules_histogram() -> Histogram {
    Histogram::new(RULES_BUCKETS)
}

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    plugin_requests: Family<PluginLabels, Counter>,
    istio_plugin_requests: Family<ResponseCode, Counter>,
    add_latency: Histogram,
    enrolments: Family<ResultLabel, Counter>,
    rules_apply: HistogramFamily<BackendLabel>,
    ztunnels: Gauge,
    pods: Family<StateLabel, Gauge>,
    reconcile_runs: Counter,
    reconcile_duration: Histogram,
    reconcile_events: Family<TypeLabel, Counter>,
    install_repairs: Counter,
    installs: Family<ResultLabel, Counter>,
    install_ready: Gauge,
    plugin_fallbacks: Family<OutcomeLabel, Counter>,
    hooks: RwLock<Vec<ScrapeHook>>,
    /// Serialises the `sync_*` read-then-add (two scrapes may run at once).
    sync: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (gauges at 0).
    pub fn new() -> Self {
        let mut r = Registry::default();
        let plugin_requests = Family::<PluginLabels, Counter>::default();
        r.register(
            "ambient_cni_plugin_requests",
            "Plugin requests answered by the agent, by CNI command and result",
            plugin_requests.clone(),
        );
        let istio_plugin_requests = Family::<ResponseCode, Counter>::default();
        r.register(
            "istio_cni_plugin_requests",
            "Plugin ADD requests, by HTTP-style response code (Istio's name)",
            istio_plugin_requests.clone(),
        );
        let add_latency = Histogram::new(ADD_BUCKETS);
        r.register_with_unit(
            "ambient_cni_plugin_add_duration",
            "Time the agent took to answer a plugin ADD",
            Unit::Seconds,
            add_latency.clone(),
        );
        let enrolments = Family::<ResultLabel, Counter>::default();
        r.register(
            "ambient_cni_enrolments",
            "Enrolment attempts, by result",
            enrolments.clone(),
        );
        let rules_apply: HistogramFamily<BackendLabel> =
            Family::new_with_constructor(rules_histogram);
        r.register_with_unit(
            "ambient_cni_rules_apply_duration",
            "Time to install the in-pod rules and route in one pod netns, by backend",
            Unit::Seconds,
            rules_apply.clone(),
        );
        let ztunnels = Gauge::default();
        r.register(
            "ztunnel_connected",
            "ztunnel connections on the ZDS socket (Istio's name)",
            ztunnels.clone(),
        );
        let pods = Family::<StateLabel, Gauge>::default();
        r.register(
            "ambient_cni_pods",
            "Pods held by the agent, by redirection state",
            pods.clone(),
        );
        let reconcile_runs = Counter::default();
        r.register(
            "ambient_cni_reconcile_runs",
            "Full reconciliations of the held pods (at start and after resyncs)",
            reconcile_runs.clone(),
        );
        let reconcile_duration = Histogram::new(RECONCILE_BUCKETS);
        r.register_with_unit(
            "ambient_cni_reconcile_duration",
            "Duration of a full reconciliation",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let reconcile_events = Family::<TypeLabel, Counter>::default();
        r.register(
            "nodeagent_reconcile_events",
            "Pod and namespace events handled, by type (Istio's name)",
            reconcile_events.clone(),
        );
        let install_repairs = Counter::default();
        r.register(
            "ambient_cni_install_repairs",
            "Times the installer put the plugin or its conflist entry back",
            install_repairs.clone(),
        );
        let installs = Family::<ResultLabel, Counter>::default();
        r.register(
            "istio_cni_installs",
            "Installer runs, by result (Istio's name)",
            installs.clone(),
        );
        let install_ready = Gauge::default();
        r.register(
            "istio_cni_install_ready",
            "1 while the plugin and its conflist entry are in place (Istio's name)",
            install_ready.clone(),
        );
        let plugin_fallbacks = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "ambient_cni_plugin_fallback",
            "Plugin ADDs the agent did not answer, by what the decisions file allowed (counted by the plugin, read on scrape)",
            plugin_fallbacks.clone(),
        );
        // Known series start at 0, so rates and alerts work before the first event.
        for outcome in ["pass_through", "fail_closed"] {
            let _ = plugin_fallbacks.get_or_create(&OutcomeLabel { outcome });
        }
        for state in ["enabled", "pending", "failed"] {
            pods.get_or_create(&StateLabel { state }).set(0);
        }
        for result in ENROLMENT_RESULTS {
            let _ = enrolments.get_or_create(&ResultLabel { result });
        }
        for response_code in ["200", "400", "500", "503"] {
            let _ = istio_plugin_requests.get_or_create(&ResponseCode { response_code });
        }
        for result in [
            result::CAPTURED,
            result::NOT_IN_MESH,
            result::UNAVAILABLE,
            result::REFUSED,
            result::ERROR,
        ] {
            let _ = plugin_requests.get_or_create(&PluginLabels {
                command: "ADD",
                result,
            });
        }
        for r#type in ["add", "update", "delete", "namespace"] {
            let _ = reconcile_events.get_or_create(&TypeLabel { r#type });
        }
        let _ = installs.get_or_create(&ResultLabel { result: "SUCCESS" });
        Self {
            registry: r,
            plugin_requests,
            istio_plugin_requests,
            add_latency,
            enrolments,
            rules_apply,
            ztunnels,
            pods,
            reconcile_runs,
            reconcile_duration,
            reconcile_events,
            install_repairs,
            installs,
            install_ready,
            plugin_fallbacks,
            hooks: RwLock::new(Vec::new()),
            sync: Mutex::new(()),
        }
    }

    /// One plugin request answered: `command` is ADD/DEL/CHECK/STATUS/GC, `result` one of [`result`].
    /// ADDs also count in Istio's `istio_cni_plugin_requests_total{response_code}`.
    pub fn plugin_request(&self, command: &'static str, result: &'static str) {
        self.plugin_requests
            .get_or_create(&PluginLabels { command, result })
            .inc();
        if command == "ADD" {
            let response_code = match result {
                result::CAPTURED | result::NOT_IN_MESH | result::OK => "200",
                result::REFUSED => "400",
                result::UNAVAILABLE => "503",
                _ => "500",
            };
            self.istio_plugin_requests
                .get_or_create(&ResponseCode { response_code })
                .inc();
        }
    }

    /// Plugin fallbacks counted since the last scrape: passed through, failed closed.
    pub fn plugin_fallbacks(&self, pass_through: u64, fail_closed: u64) {
        for (outcome, n) in [("pass_through", pass_through), ("fail_closed", fail_closed)] {
            self.plugin_fallbacks
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(n);
        }
    }

    /// Time the agent took to answer one ADD.
    pub fn add_latency(&self, d: Duration) {
        self.add_latency.observe(d.as_secs_f64());
    }

    /// One enrolment attempt ended with `result` (see [`enrolment_result`]).
    pub fn enrolment(&self, result: &'static str) {
        self.enrolments.get_or_create(&ResultLabel { result }).inc();
    }

    /// One rules install in a pod netns by `backend` (`iptables` | `nftables`) took `d`.
    pub fn rules_apply(&self, backend: &'static str, d: Duration) {
        self.rules_apply
            .get_or_create(&BackendLabel { backend })
            .observe(d.as_secs_f64());
    }

    /// The number of connected ztunnels.
    pub fn set_ztunnels(&self, n: usize) {
        self.ztunnels.set(n as i64);
    }

    /// Held pods by state.
    pub fn set_pods(&self, enabled: usize, pending: usize, failed: usize) {
        for (state, n) in [
            ("enabled", enabled),
            ("pending", pending),
            ("failed", failed),
        ] {
            self.pods.get_or_create(&StateLabel { state }).set(n as i64);
        }
    }

    /// One full reconciliation took `d`.
    pub fn reconcile(&self, d: Duration) {
        self.reconcile_runs.inc();
        self.reconcile_duration.observe(d.as_secs_f64());
    }

    /// One pod/namespace event handled: `add`, `update`, `delete` or `namespace`.
    pub fn reconcile_event(&self, kind: &'static str) {
        self.reconcile_events
            .get_or_create(&TypeLabel { r#type: kind })
            .inc();
    }

    /// The installer repaired the plugin binary or its conflist entry.
    pub fn install_repair(&self) {
        self.install_repairs.inc();
    }

    /// Brings the repairs counter up to `total` (for an installer that keeps its own count;
    /// a counter never goes down, so a lower `total` is ignored).
    pub fn sync_install_repairs(&self, total: u64) {
        let _one = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.install_repairs.get();
        if total > now {
            self.install_repairs.inc_by(total - now);
        }
    }

    /// Brings `istio_cni_installs_total{result}` up to `total` (see [`Metrics::sync_install_repairs`]).
    pub fn sync_installs(&self, result: &'static str, total: u64) {
        let _one = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let c = self.installs.get_or_create(&ResultLabel { result });
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    /// One installer run ended with `result` (Istio's values: `SUCCESS`, `COPY_BINARIES_FAILURE`,
    /// `CREATE_CNI_CONFIG_FAILURE`, ...).
    pub fn install(&self, result: &'static str) {
        self.installs.get_or_create(&ResultLabel { result }).inc();
    }

    /// Whether the plugin and its conflist entry are in place.
    pub fn set_install_ready(&self, ready: bool) {
        self.install_ready.set(i64::from(ready));
    }

    /// Runs `hook` before every scrape (to sample gauges from live state).
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// Samples the enroller's state at every scrape: connected ztunnels and pods by state.
    pub fn watch_enroller(&self, enroller: Arc<Enroller>) {
        self.on_scrape(move |m| {
            m.set_ztunnels(enroller.ztunnels());
            let (enabled, pending, failed) = pod_states(&enroller.table);
            m.set_pods(enabled, pending, failed);
        });
    }

    /// The exposition (OpenMetrics text, ending in `# EOF`).
    pub fn render(&self) -> String {
        for hook in self.hooks.read().unwrap_or_else(|e| e.into_inner()).iter() {
            hook(self);
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The process-wide metrics (created on first use).
pub fn global() -> &'static Arc<Metrics> {
    static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(Metrics::new()))
}

/// Held pods as (enabled, pending, failed): pending pods whose last attempt failed count as failed.
pub fn pod_states(table: &Table) -> (usize, usize, usize) {
    table
        .all()
        .iter()
        .fold((0, 0, 0), |(e, p, f), h| match (h.phase, &h.last_error) {
            (Phase::Enabled, _) => (e + 1, p, f),
            (Phase::Pending, None) => (e, p + 1, f),
            (Phase::Pending, Some(_)) => (e, p, f + 1),
        })
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

/// The `result` label of a failed plugin request, from its gRPC status.
pub fn status_result(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::ResourceExhausted
        | tonic::Code::DeadlineExceeded => result::UNAVAILABLE,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => result::REFUSED,
        _ => result::ERROR,
    }
}

/// The `result` label of an ADD.
pub fn add_result(r: &Result<pb::Decision, tonic::Status>) -> &'static str {
    match r {
        Ok(pb::Decision::Captured) => result::CAPTURED,
        Ok(_) => result::NOT_IN_MESH,
        Err(s) => status_result(s),
    }
}

/// The `result` label of DEL/GC (`ok`) or CHECK/STATUS (`ok`/`not_ok` from `good`).
pub fn outcome<T>(r: &Result<T, tonic::Status>, good: impl FnOnce(&T) -> bool) -> &'static str {
    match r {
        Ok(v) if good(v) => result::OK,
        Ok(_) => result::NOT_OK,
        Err(s) => status_result(s),
    }
}

/// The metrics port's handler (`/metrics`).
pub fn handler(metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |path: &str| match path {
        "/metrics" => Reply {
            status: 200,
            content_type: CONTENT_TYPE,
            body: metrics.render(),
        },
        other => Reply::not_found(other),
    })
}

/// Binds `addr` and serves `/metrics` until `shutdown` resolves.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HttpError> {
    let listener = http::bind(addr).await?;
    http::serve(
        listener,
        "metrics",
        handler(metrics),
        http::Limits::METRICS,
        shutdown,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    // The strict exposition reader is a development tool (the agent only writes the format).
    use ambient_cni_tests::expo;

    fn scrape(m: &Metrics) -> expo::Exposition {
        let text = m.render();
        expo::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn every_metric_is_exported_with_its_type() {
        let m = Metrics::new();
        m.plugin_request("ADD", result::CAPTURED);
        m.rules_apply("nftables", Duration::from_millis(3));
        m.reconcile_event("add");
        m.install("SUCCESS");
        let e = scrape(&m);
        assert!(e.eof);
        let want = [
            ("ambient_cni_plugin_requests", "counter"),
            ("istio_cni_plugin_requests", "counter"),
            ("ambient_cni_plugin_add_duration_seconds", "histogram"),
            ("ambient_cni_enrolments", "counter"),
            ("ambient_cni_rules_apply_duration_seconds", "histogram"),
            ("ztunnel_connected", "gauge"),
            ("ambient_cni_pods", "gauge"),
            ("ambient_cni_reconcile_runs", "counter"),
            ("ambient_cni_reconcile_duration_seconds", "histogram"),
            ("nodeagent_reconcile_events", "counter"),
            ("ambient_cni_install_repairs", "counter"),
            ("istio_cni_installs", "counter"),
            ("istio_cni_install_ready", "gauge"),
            ("ambient_cni_plugin_fallback", "counter"),
        ];
        let got: Vec<(&str, &str)> = e
            .families
            .iter()
            .map(|f| (f.name.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(got, want);
        for f in &e.families {
            assert!(
                f.help.as_deref().is_some_and(|h| !h.is_empty()),
                "{} has no help",
                f.name
            );
        }
    }

    #[test]
    fn methods_move_the_right_series() {
        let m = Metrics::new();
        m.plugin_request("ADD", result::CAPTURED);
        m.plugin_request("ADD", result::CAPTURED);
        m.plugin_request("ADD", result::NOT_IN_MESH);
        m.plugin_request("ADD", result::UNAVAILABLE);
        m.plugin_request("DEL", result::OK);
        m.add_latency(Duration::from_millis(2));
        m.add_latency(Duration::from_millis(300));
        m.enrolment("enabled");
        m.rules_apply("iptables", Duration::from_millis(20));
        m.set_ztunnels(2);
        m.set_pods(3, 1, 0);
        m.reconcile(Duration::from_millis(40));
        m.reconcile_event("delete");
        m.install_repair();
        m.sync_install_repairs(3);
        m.sync_install_repairs(2);
        m.sync_installs("SUCCESS", 2);
        m.set_install_ready(true);
        let e = scrape(&m);
        let v = |n: &str, l: &[(&str, &str)]| e.value(n, l).unwrap_or_else(|| panic!("{n} {l:?}"));
        assert_eq!(
            v(
                "ambient_cni_plugin_requests_total",
                &[("command", "ADD"), ("result", "captured")]
            ),
            2.0
        );
        assert_eq!(
            v(
                "ambient_cni_plugin_requests_total",
                &[("command", "DEL"), ("result", "ok")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "istio_cni_plugin_requests_total",
                &[("response_code", "200")]
            ),
            3.0
        );
        assert_eq!(
            v(
                "istio_cni_plugin_requests_total",
                &[("response_code", "503")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "istio_cni_plugin_requests_total",
                &[("response_code", "500")]
            ),
            0.0
        );
        assert_eq!(
            v("ambient_cni_enrolments_total", &[("result", "rules_error")]),
            0.0
        );
        assert_eq!(v("ambient_cni_plugin_add_duration_seconds_count", &[]), 2.0);
        assert_eq!(
            v(
                "ambient_cni_plugin_add_duration_seconds_bucket",
                &[("le", "0.0025")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "ambient_cni_plugin_add_duration_seconds_bucket",
                &[("le", "0.5")]
            ),
            2.0
        );
        assert_eq!(
            v("ambient_cni_enrolments_total", &[("result", "enabled")]),
            1.0
        );
        assert_eq!(
            v(
                "ambient_cni_rules_apply_duration_seconds_count",
                &[("backend", "iptables")]
            ),
            1.0
        );
        assert_eq!(v("ztunnel_connected", &[]), 2.0);
        assert_eq!(v("ambient_cni_pods", &[("state", "enabled")]), 3.0);
        assert_eq!(v("ambient_cni_pods", &[("state", "pending")]), 1.0);
        assert_eq!(v("ambient_cni_pods", &[("state", "failed")]), 0.0);
        assert_eq!(v("ambient_cni_reconcile_runs_total", &[]), 1.0);
        assert_eq!(v("ambient_cni_reconcile_duration_seconds_count", &[]), 1.0);
        assert_eq!(
            v("nodeagent_reconcile_events_total", &[("type", "delete")]),
            1.0
        );
        assert_eq!(
            v("ambient_cni_install_repairs_total", &[]),
            3.0,
            "synced up, never down"
        );
        assert_eq!(v("istio_cni_installs_total", &[("result", "SUCCESS")]), 2.0);
        assert_eq!(v("istio_cni_install_ready", &[]), 1.0);
    }

    #[test]
    fn scrape_hooks_sample_live_state() {
        let m = Metrics::new();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n2 = n.clone();
        m.on_scrape(move |m| m.set_ztunnels(n2.load(std::sync::atomic::Ordering::Relaxed)));
        assert_eq!(scrape(&m).value("ztunnel_connected", &[]), Some(0.0));
        n.store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(scrape(&m).value("ztunnel_connected", &[]), Some(1.0));
    }

    #[test]
    fn result_labels_follow_the_outcome() {
        assert_eq!(add_result(&Ok(pb::Decision::Captured)), "captured");
        assert_eq!(add_result(&Ok(pb::Decision::NotInMesh)), "not_in_mesh");
        assert_eq!(
            add_result(&Err(tonic::Status::unavailable("x"))),
            "unavailable"
        );
        assert_eq!(
            add_result(&Err(tonic::Status::invalid_argument("x"))),
            "refused"
        );
        assert_eq!(add_result(&Err(tonic::Status::internal("x"))), "error");
        assert_eq!(
            outcome(&Ok::<bool, tonic::Status>(false), |ok| *ok),
            "not_ok"
        );
        assert_eq!(outcome(&Ok::<(), tonic::Status>(()), |_| true), "ok");
        let pod = crate::pods::PodId {
            namespace: "n".into(),
            name: "p".into(),
            uid: "u".into(),
        };
        let err = EnrollError::Ztunnel {
            pod,
            msg: "m".into(),
        };
        assert_eq!(enrolment_result(&Err(err)), "pending");
        assert_eq!(enrolment_result(&Ok(())), "enabled");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scraped_over_http_with_the_openmetrics_content_type() {
        let m = Arc::new(Metrics::new());
        m.plugin_request("ADD", result::CAPTURED);
        let listener = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(http::serve(
            listener,
            "metrics",
            handler(m),
            http::Limits::METRICS,
            async {
                let _ = stopped.await;
            },
        ));
        let raw = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}")),
            "{head}"
        );
        let e = expo::parse(body).unwrap();
        assert_eq!(
            e.value(
                "istio_cni_plugin_requests_total",
                &[("response_code", "200")]
            ),
            Some(1.0)
        );
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
