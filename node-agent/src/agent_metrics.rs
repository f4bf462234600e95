//! Every metric the agent exports: one registry built at start, each module's metrics
//! registered into it in a fixed order (the exposition's order), then handed down by
//! constructor to the module that moves them.

use std::sync::Arc;

use crate::mesh::metrics::{EnrolMetrics, ReconcileMetrics};
use crate::mesh::sidecar_metrics::SidecarMetrics;
use crate::obs::fallbacks::FallbackMetrics;
use crate::obs::installer::InstallMetrics;
use crate::obs::metrics::{Metrics, Registry};
use crate::plugin_server::metrics::PluginMetrics;
use crate::sidecar_repair::metrics::RepairMetrics;
use crate::verify::metrics::VerifyMetrics;

/// The agent's metrics, by owner, and the exposition that serves them all.
#[derive(Debug)]
pub struct AgentMetrics {
    /// The `/metrics` exposition (and its scrape hooks).
    pub exposition: Arc<Metrics>,
    /// The plugin socket's.
    pub plugin: Arc<PluginMetrics>,
    /// The enroller's.
    pub enrol: Arc<EnrolMetrics>,
    /// The controller's.
    pub reconcile: Arc<ReconcileMetrics>,
    /// The installer's.
    pub install: Arc<InstallMetrics>,
    /// The plugin's fallback counter.
    pub fallbacks: Arc<FallbackMetrics>,
    /// The drift verifier's.
    pub verify: Arc<VerifyMetrics>,
    /// The sidecar repair controller's.
    pub repair: Arc<RepairMetrics>,
    /// Sidecar mode's.
    pub sidecar: Arc<SidecarMetrics>,
}

impl AgentMetrics {
    /// A fresh registry with every metric registered (known series at 0).
    pub fn new() -> Self {
        let mut r = Registry::default();
        let plugin = Arc::new(PluginMetrics::new(&mut r));
        let enrol = Arc::new(EnrolMetrics::new(&mut r));
        let reconcile = Arc::new(ReconcileMetrics::new(&mut r));
        let install = Arc::new(InstallMetrics::new(&mut r));
        let fallbacks = Arc::new(FallbackMetrics::new(&mut r));
        let verify = Arc::new(VerifyMetrics::new(&mut r));
        let sidecar = Arc::new(SidecarMetrics::new(&mut r));
        let repair = Arc::new(RepairMetrics::new(&mut r));
        Self {
            exposition: Arc::new(Metrics::new(r)),
            plugin,
            enrol,
            reconcile,
            install,
            fallbacks,
            verify,
            repair,
            sidecar,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::metrics::AddPhase;
    use crate::plugin_server::metrics::result;
    use ambient_cni_tests::expo;
    use std::time::Duration;

    fn scrape(m: &AgentMetrics) -> expo::Exposition {
        let text = m.exposition.render();
        expo::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn every_metric_is_exported_with_its_type() {
        let m = AgentMetrics::new();
        m.plugin.request("ADD", result::CAPTURED);
        m.enrol.rules_apply("nftables", Duration::from_millis(3));
        m.reconcile.event("add");
        m.install.install("SUCCESS");
        let e = scrape(&m);
        assert!(e.eof);
        let want = [
            ("ambient_cni_plugin_requests", "counter"),
            ("istio_cni_plugin_requests", "counter"),
            ("ambient_cni_plugin_add_duration_seconds", "histogram"),
            ("ambient_cni_enrolments", "counter"),
            ("ambient_cni_rules_apply_duration_seconds", "histogram"),
            ("ambient_cni_add_phase_seconds", "histogram"),
            ("ztunnel_connected", "gauge"),
            ("ambient_cni_pods", "gauge"),
            ("ambient_cni_reconcile_runs", "counter"),
            ("ambient_cni_reconcile_duration_seconds", "histogram"),
            ("nodeagent_reconcile_events", "counter"),
            ("ambient_cni_install_repairs", "counter"),
            ("istio_cni_installs", "counter"),
            ("istio_cni_install_ready", "gauge"),
            ("ambient_cni_plugin_fallback", "counter"),
            ("ambient_cni_drift_repairs", "counter"),
            ("ambient_cni_verifications", "counter"),
            ("ambient_cni_verify_pass_seconds", "histogram"),
            ("ambient_cni_drift_watched_pods", "gauge"),
            ("ambient_cni_drift_notifications", "counter"),
            ("ambient_cni_sidecar_adds", "counter"),
            ("ambient_cni_sidecar_add_duration_seconds", "histogram"),
            ("istio_cni_repair_pods_repaired", "counter"),
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
        let m = AgentMetrics::new();
        m.plugin.request("ADD", result::CAPTURED);
        m.plugin.request("ADD", result::CAPTURED);
        m.plugin.request("ADD", result::NOT_IN_MESH);
        m.plugin.request("ADD", result::UNAVAILABLE);
        m.plugin.request("DEL", result::OK);
        m.plugin.add_latency(Duration::from_millis(2));
        m.plugin.add_latency(Duration::from_millis(300));
        m.enrol.enrolment("enabled");
        m.enrol.rules_apply("iptables", Duration::from_millis(20));
        m.enrol
            .add_phase(AddPhase::Record, Duration::from_micros(80));
        m.enrol.set_ztunnels(2);
        m.enrol.set_pods(3, 1, 0);
        m.reconcile.reconcile(Duration::from_millis(40));
        m.reconcile.event("delete");
        m.install.repair();
        m.install.sync_repairs(3);
        m.install.sync_repairs(2);
        m.install.sync_installs("SUCCESS", 2);
        m.install.set_ready(true);
        m.fallbacks.add(2, 1);
        m.verify.repaired(iptables_rules::drift::DriftKind::Rules);
        m.sidecar.add(
            crate::mesh::sidecar_metrics::result::PROGRAMMED,
            Duration::from_millis(4),
        );
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
        // Sub-millisecond phases land in their own buckets; every phase is exported from the start.
        assert_eq!(
            v(
                "ambient_cni_add_phase_seconds_bucket",
                &[("phase", "record"), ("le", "0.0001")]
            ),
            1.0
        );
        let under_50us = e
            .families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == "ambient_cni_add_phase_seconds_bucket")
            .filter(|s| s.labels.get("phase").map(String::as_str) == Some("record"))
            .find(|s| s.labels.get("le").and_then(|l| l.parse::<f64>().ok()) == Some(0.00005))
            .map(|s| s.value);
        assert_eq!(under_50us, Some(0.0), "a 50 µs bucket, empty");
        for phase in AddPhase::ALL {
            assert!(
                e.value(
                    "ambient_cni_add_phase_seconds_count",
                    &[("phase", phase.as_str())]
                )
                .is_some(),
                "{phase:?}"
            );
        }
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
        assert_eq!(
            v(
                "ambient_cni_plugin_fallback_total",
                &[("outcome", "pass_through")]
            ),
            2.0
        );
        assert_eq!(
            v("ambient_cni_drift_repairs_total", &[("kind", "rules")]),
            1.0
        );
        assert_eq!(
            v("ambient_cni_drift_repairs_total", &[("kind", "probe_set")]),
            0.0
        );
        assert_eq!(
            v("ambient_cni_verifications_total", &[("result", "clean")]),
            0.0
        );
        assert_eq!(
            v(
                "ambient_cni_sidecar_adds_total",
                &[("result", "programmed")]
            ),
            1.0
        );
        assert_eq!(
            v("ambient_cni_sidecar_adds_total", &[("result", "invalid")]),
            0.0
        );
        assert_eq!(
            v("ambient_cni_sidecar_add_duration_seconds_count", &[]),
            1.0
        );
    }
}
