//! Sidecar mode's metrics: ADDs of sidecar-injected pods by result, and their duration.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `result` label of `ambient_cni_sidecar_adds_total`.
pub mod result {
    /// The rules were installed.
    pub const PROGRAMMED: &str = "programmed";
    /// Exactly these rules were already there (a re-ADD); nothing written.
    pub const UNCHANGED: &str = "unchanged";
    /// An annotation or proxy env value Istio would refuse; nothing written.
    pub const INVALID: &str = "invalid";
    /// The netns could not be opened or the rules not installed.
    pub const FAILED: &str = "failed";
    /// Every result, in the exposition's order.
    pub const ALL: [&str; 4] = [PROGRAMMED, UNCHANGED, INVALID, FAILED];
}

/// Seconds; a netns open plus one restore batch or netlink transaction.
const ADD_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Sidecar mode's metrics.
#[derive(Debug)]
pub struct SidecarMetrics {
    adds: Family<ResultLabel, Counter>,
    add_duration: Histogram,
}

impl SidecarMetrics {
    /// Registers sidecar mode's metrics in `r` (every result at 0).
    pub fn new(r: &mut Registry) -> Self {
        let adds = Family::<ResultLabel, Counter>::default();
        r.register(
            "ambient_cni_sidecar_adds",
            "ADDs of sidecar-injected pods (Istio's sidecar redirection), by result",
            adds.clone(),
        );
        let add_duration = Histogram::new(ADD_BUCKETS);
        r.register_with_unit(
            "ambient_cni_sidecar_add_duration",
            "Time the agent took to program one sidecar pod at ADD (netns open and rules)",
            Unit::Seconds,
            add_duration.clone(),
        );
        for result in result::ALL {
            let _ = adds.get_or_create(&ResultLabel { result });
        }
        Self { adds, add_duration }
    }

    /// One sidecar ADD ended with `result` (one of [`result`]) after `d`.
    pub fn add(&self, result: &'static str, d: Duration) {
        self.adds.get_or_create(&ResultLabel { result }).inc();
        self.add_duration.observe(d.as_secs_f64());
    }
}

impl Default for SidecarMetrics {
    /// Metrics registered nowhere (tests, tools).
    fn default() -> Self {
        Self::new(&mut Registry::default())
    }
}
