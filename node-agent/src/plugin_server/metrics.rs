//! The plugin socket's metrics: requests answered by command and result, and ADD latency.

use std::time::Duration;

use ambient_cni_api::plugin as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Plugin results (`result` label of `ambient_cni_plugin_requests_total`).
pub mod result {
    /// ADD: the pod was captured.
    pub const CAPTURED: &str = "captured";
    /// ADD: the pod is not in the mesh.
    pub const NOT_IN_MESH: &str = "not_in_mesh";
    /// ADD: a sidecar-injected pod got Istio's sidecar redirection.
    pub const SIDECAR: &str = "sidecar";
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

/// Seconds; plugin ADD is budgeted at `timeout_ms` (5 s by default). Fine below 10 ms, where
/// a captured ADD's answer lies, so its median can be read to a tenth of a millisecond.
const ADD_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The plugin socket's metrics.
#[derive(Debug)]
pub struct PluginMetrics {
    requests: Family<PluginLabels, Counter>,
    istio_requests: Family<ResponseCode, Counter>,
    add_latency: Histogram,
}

impl PluginMetrics {
    /// Registers the plugin socket's metrics in `r` (known series at 0).
    pub fn new(r: &mut Registry) -> Self {
        let requests = Family::<PluginLabels, Counter>::default();
        r.register(
            "ambient_cni_plugin_requests",
            "Plugin requests answered by the agent, by CNI command and result",
            requests.clone(),
        );
        let istio_requests = Family::<ResponseCode, Counter>::default();
        r.register(
            "istio_cni_plugin_requests",
            "Plugin ADD requests, by HTTP-style response code (Istio's name)",
            istio_requests.clone(),
        );
        let add_latency = Histogram::new(ADD_BUCKETS);
        r.register_with_unit(
            "ambient_cni_plugin_add_duration",
            "Time the agent took to answer a plugin ADD",
            Unit::Seconds,
            add_latency.clone(),
        );
        // Known series start at 0, so rates and alerts work before the first event.
        for response_code in ["200", "400", "500", "503"] {
            let _ = istio_requests.get_or_create(&ResponseCode { response_code });
        }
        for result in [
            result::CAPTURED,
            result::NOT_IN_MESH,
            result::SIDECAR,
            result::UNAVAILABLE,
            result::REFUSED,
            result::ERROR,
        ] {
            let _ = requests.get_or_create(&PluginLabels {
                command: "ADD",
                result,
            });
        }
        Self {
            requests,
            istio_requests,
            add_latency,
        }
    }

    /// One plugin request answered: `command` is ADD/DEL/CHECK/STATUS/GC, `result` one of [`result`].
    /// ADDs also count in Istio's `istio_cni_plugin_requests_total{response_code}`.
    pub fn request(&self, command: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&PluginLabels { command, result })
            .inc();
        if command == "ADD" {
            let response_code = match result {
                result::CAPTURED | result::NOT_IN_MESH | result::SIDECAR | result::OK => "200",
                result::REFUSED => "400",
                result::UNAVAILABLE => "503",
                _ => "500",
            };
            self.istio_requests
                .get_or_create(&ResponseCode { response_code })
                .inc();
        }
    }

    /// Time the agent took to answer one ADD.
    pub fn add_latency(&self, d: Duration) {
        self.add_latency.observe(d.as_secs_f64());
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
        Ok(pb::Decision::Sidecar) => result::SIDECAR,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_labels_follow_the_outcome() {
        assert_eq!(add_result(&Ok(pb::Decision::Captured)), "captured");
        assert_eq!(add_result(&Ok(pb::Decision::NotInMesh)), "not_in_mesh");
        assert_eq!(add_result(&Ok(pb::Decision::Sidecar)), "sidecar");
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
    }
}
