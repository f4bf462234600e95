//! The enrolment pipeline's metrics: enrolment results, rules timing, the phases of each
//! ADD, the held pods and connected ztunnels (sampled at scrape), and reconciliations.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::table::{Phase, Table};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every `result` of an enrolment (`mesh::enroller::enrolment_result`).
const ENROLMENT_RESULTS: [&str; 4] = ["enabled", "pending", "netns_error", "rules_error"];

/// Seconds; one netns entry plus a restore batch or a netlink transaction.
const RULES_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Seconds; an ADD's phases run from tens of microseconds (a table insert) to seconds
/// (ztunnel's ack under load), so the buckets start at 25 µs, and are dense below 5 ms,
/// where a captured ADD's phases are (their medians are read off these buckets).
const PHASE_BUCKETS: [f64; 22] = [
    0.000025, 0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015,
    0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Seconds; a full reconciliation of every held pod.
const RECONCILE_BUCKETS: [f64; 10] = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0];

fn rules_histogram() -> Histogram {
    Histogram::new(RULES_BUCKETS)
}

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

/// One phase of a plugin ADD, timed by the agent's own clock
/// (`phase` label of `ambient_cni_add_phase_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddPhase {
    /// The pod's lookup (cache, watch wait, API get).
    Lookup,
    /// Opening the pod's netns.
    Netns,
    /// Installing the in-pod rules.
    Rules,
    /// Holding the pod and writing its netns record.
    Record,
    /// ztunnel's AddWorkload and its ack.
    Ztunnel,
    /// The host probe set.
    Probes,
    /// The pod's status annotation.
    Status,
}

impl AddPhase {
    /// Every phase, in the order an ADD runs them.
    pub const ALL: [AddPhase; 7] = [
        Self::Lookup,
        Self::Netns,
        Self::Rules,
        Self::Record,
        Self::Ztunnel,
        Self::Probes,
        Self::Status,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lookup => "lookup",
            Self::Netns => "netns",
            Self::Rules => "rules",
            Self::Record => "record",
            Self::Ztunnel => "ztunnel",
            Self::Probes => "probes",
            Self::Status => "status",
        }
    }
}

/// The enroller's metrics.
#[derive(Debug)]
pub struct EnrolMetrics {
    enrolments: Family<ResultLabel, Counter>,
    rules_apply: HistogramFamily<BackendLabel>,
    add_phases: HistogramFamily<PhaseLabel>,
    ztunnels: Gauge,
    pods: Family<StateLabel, Gauge>,
}

impl EnrolMetrics {
    /// Registers the enroller's metrics in `r` (known series at 0).
    pub fn new(r: &mut Registry) -> Self {
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
        let add_phases: HistogramFamily<PhaseLabel> = Family::new_with_constructor(phase_histogram);
        r.register_with_unit(
            "ambient_cni_add_phase",
            "Time each phase of a plugin ADD took in the agent, by phase",
            Unit::Seconds,
            add_phases.clone(),
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
        for state in ["enabled", "pending", "failed"] {
            pods.get_or_create(&StateLabel { state }).set(0);
        }
        for result in ENROLMENT_RESULTS {
            let _ = enrolments.get_or_create(&ResultLabel { result });
        }
        for phase in AddPhase::ALL {
            let _ = add_phases.get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            });
        }
        Self {
            enrolments,
            rules_apply,
            add_phases,
            ztunnels,
            pods,
        }
    }

    /// One enrolment attempt ended with `result` (one of `enabled`, `pending`, `netns_error`, `rules_error`).
    pub fn enrolment(&self, result: &'static str) {
        self.enrolments.get_or_create(&ResultLabel { result }).inc();
    }

    /// One rules install in a pod netns by `backend` (`iptables` | `nftables`) took `d`.
    pub fn rules_apply(&self, backend: &'static str, d: Duration) {
        self.rules_apply
            .get_or_create(&BackendLabel { backend })
            .observe(d.as_secs_f64());
    }

    /// One phase of an ADD took `d`.
    pub fn add_phase(&self, phase: AddPhase, d: Duration) {
        self.add_phases
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
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
}

/// The controller's metrics: full reconciliations and the events it handled.
#[derive(Debug)]
pub struct ReconcileMetrics {
    runs: Counter,
    duration: Histogram,
    events: Family<TypeLabel, Counter>,
}

impl ReconcileMetrics {
    /// Registers the controller's metrics in `r` (known series at 0).
    pub fn new(r: &mut Registry) -> Self {
        let runs = Counter::default();
        r.register(
            "ambient_cni_reconcile_runs",
            "Full reconciliations of the held pods (at start and after resyncs)",
            runs.clone(),
        );
        let duration = Histogram::new(RECONCILE_BUCKETS);
        r.register_with_unit(
            "ambient_cni_reconcile_duration",
            "Duration of a full reconciliation",
            Unit::Seconds,
            duration.clone(),
        );
        let events = Family::<TypeLabel, Counter>::default();
        r.register(
            "nodeagent_reconcile_events",
            "Pod and namespace events handled, by type (Istio's name)",
            events.clone(),
        );
        for r#type in ["add", "update", "delete", "namespace"] {
            let _ = events.get_or_create(&TypeLabel { r#type });
        }
        Self {
            runs,
            duration,
            events,
        }
    }

    /// One full reconciliation took `d`.
    pub fn reconcile(&self, d: Duration) {
        self.runs.inc();
        self.duration.observe(d.as_secs_f64());
    }

    /// One pod/namespace event handled: `add`, `update`, `delete` or `namespace`.
    pub fn event(&self, kind: &'static str) {
        self.events.get_or_create(&TypeLabel { r#type: kind }).inc();
    }
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
