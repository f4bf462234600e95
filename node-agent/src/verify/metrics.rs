//! The verifier's metrics: repairs by what drifted, verifications by result, pass duration.

use std::time::Duration;

use iptables_rules::drift::DriftKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::outcome::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every `result` of [`Outcome::label`].
const RESULTS: [&str; 4] = ["clean", "repaired", "repair_failed", "error"];
/// Seconds; one pass over every held pod (spread over the interval, so mostly idle time).
const PASS_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// `ambient_cni_drift_repairs_total{kind}`, `ambient_cni_verifications_total{result}`,
/// `ambient_cni_verify_pass_seconds`, `ambient_cni_drift_watched_pods`,
/// `ambient_cni_drift_notifications_total`.
#[derive(Debug)]
pub struct VerifyMetrics {
    repairs: Family<KindLabel, Counter>,
    verifications: Family<ResultLabel, Counter>,
    pass: Histogram,
    watched: Gauge,
    notifications: Counter,
}

impl VerifyMetrics {
    /// Creates the metrics and registers them in `registry` (every label value starts at 0).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            repairs: Family::default(),
            verifications: Family::default(),
            pass: Histogram::new(PASS_BUCKETS),
            watched: Gauge::default(),
            notifications: Counter::default(),
        };
        for kind in DriftKind::ALL {
            let _ = m.repairs.get_or_create(&KindLabel {
                kind: kind.as_str(),
            });
        }
        for result in RESULTS {
            let _ = m.verifications.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "ambient_cni_drift_repairs",
            "Held pods whose capture had drifted and was repaired, by what drifted",
            m.repairs.clone(),
        );
        registry.register(
            "ambient_cni_verifications",
            "Verifications of a held pod's capture, by result",
            m.verifications.clone(),
        );
        registry.register_with_unit(
            "ambient_cni_verify_pass",
            "Duration of one verification pass over every held pod",
            Unit::Seconds,
            m.pass.clone(),
        );
        registry.register(
            "ambient_cni_drift_watched_pods",
            "Held pods whose netns is watched for nf_tables and route/rule changes",
            m.watched.clone(),
        );
        registry.register(
            "ambient_cni_drift_notifications",
            "Kernel notifications (coalesced) that sent a held pod to verification at once",
            m.notifications.clone(),
        );
        m
    }

    /// Sets the number of watched pods.
    pub fn set_watched(&self, n: usize) {
        self.watched.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one notification-triggered verification request.
    pub fn notified(&self) {
        self.notifications.inc();
    }

    /// Watched pods now (tests).
    pub fn watched_pods(&self) -> i64 {
        self.watched.get()
    }

    /// Notification-triggered requests so far (tests).
    pub fn notifications(&self) -> u64 {
        self.notifications.get()
    }

    /// Counts one repair of `kind`.
    pub fn repaired(&self, kind: DriftKind) {
        self.repairs
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts one verification.
    pub fn verified(&self, outcome: &Outcome) {
        self.verifications
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .inc();
    }

    /// Records one finished pass.
    pub fn pass(&self, d: Duration) {
        self.pass.observe(d.as_secs_f64());
    }

    /// Repairs of `kind` so far (tests, benches).
    pub fn repairs(&self, kind: DriftKind) -> u64 {
        self.repairs
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .get()
    }

    /// Verifications with `result` so far (tests, benches).
    pub fn verifications(&self, result: &'static str) -> u64 {
        self.verifications
            .get_or_create(&ResultLabel { result })
            .get()
    }
}
