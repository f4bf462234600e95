//! The installer's metrics: its passes, its repairs and whether the CNI config is in place.
//! The installer keeps its own counts; they are brought up to date at each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The installer's metrics.
#[derive(Debug)]
pub struct InstallMetrics {
    repairs: Counter,
    installs: Family<ResultLabel, Counter>,
    ready: Gauge,
    /// Serialises the `sync_*` read-then-add (two scrapes may run at once).
    sync: Mutex<()>,
}

impl InstallMetrics {
    /// Registers the installer's metrics in `r` (known series at 0).
    pub fn new(r: &mut Registry) -> Self {
        let repairs = Counter::default();
        r.register(
            "ambient_cni_install_repairs",
            "Times the installer put the plugin or its conflist entry back",
            repairs.clone(),
        );
        let installs = Family::<ResultLabel, Counter>::default();
        r.register(
            "istio_cni_installs",
            "Installer runs, by result (Istio's name)",
            installs.clone(),
        );
        let ready = Gauge::default();
        r.register(
            "istio_cni_install_ready",
            "1 while the plugin and its conflist entry are in place (Istio's name)",
            ready.clone(),
        );
        let _ = installs.get_or_create(&ResultLabel { result: "SUCCESS" });
        Self {
            repairs,
            installs,
            ready,
            sync: Mutex::new(()),
        }
    }

    /// The installer repaired the plugin binary or its conflist entry.
    pub fn repair(&self) {
        self.repairs.inc();
    }

    /// Brings the repairs counter up to `total` (for an installer that keeps its own count;
    /// a counter never goes down, so a lower `total` is ignored).
    pub fn sync_repairs(&self, total: u64) {
        let _one = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.repairs.get();
        if total > now {
            self.repairs.inc_by(total - now);
        }
    }

    /// Brings `istio_cni_installs_total{result}` up to `total` (see [`InstallMetrics::sync_repairs`]).
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
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }
}
