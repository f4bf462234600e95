//! `istio_cni_repair_pods_repaired_total{type,result}`: Istio's name and labels, so istio-cni
//! dashboards and alerts keep working after the swap.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    r#type: &'static str,
    result: &'static str,
}

/// Istio's `type` values.
pub const TYPES: [&str; 3] = ["repair", "delete", "label"];
/// Istio's `result` values.
pub const RESULTS: [&str; 3] = ["success", "skip", "fail"];

/// The repair controller's counter.
#[derive(Debug, Default)]
pub struct RepairMetrics {
    repaired: Family<Labels, Counter>,
}

impl RepairMetrics {
    /// Creates the counter and registers it (every type and result starts at 0).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        for r#type in TYPES {
            for result in RESULTS {
                let _ = m.repaired.get_or_create(&Labels { r#type, result });
            }
        }
        registry.register(
            "istio_cni_repair_pods_repaired",
            "Total number of pods repaired by repair controller",
            m.repaired.clone(),
        );
        m
    }

    /// Counts one outcome (`type` of [`super::settings::Mode::metric_type`], `result` of [`RESULTS`]).
    pub fn count(&self, r#type: &'static str, result: &'static str) {
        self.repaired
            .get_or_create(&Labels { r#type, result })
            .inc();
    }

    /// The count so far (tests).
    pub fn get(&self, r#type: &'static str, result: &'static str) -> u64 {
        self.repaired
            .get_or_create(&Labels { r#type, result })
            .get()
    }
}
