//! Operability: the health port (`/healthz`, `/readyz`), the Prometheus metrics
//! port (`/metrics`) and the small HTTP server behind both.

pub mod conns;
pub mod fallbacks;
pub mod health;
pub mod http;
pub mod installer;
pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Binds the health and metrics ports (so a taken port fails the agent's start), then
/// serves them on background tasks until the future made by `shutdown` resolves. Two
/// listeners with their own limits: nothing done to the metrics port reaches the probes.
pub async fn start_servers<F>(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness: health::Readiness,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl Fn() -> F,
) -> Result<(), http::HttpError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let h = http::bind(health_addr).await?;
    let m = http::bind(metrics_addr).await?;
    tokio::spawn(http::serve(
        h,
        "health",
        health::handler(readiness),
        http::Limits::HEALTH,
        shutdown(),
    ));
    tokio::spawn(http::serve(
        m,
        "metrics",
        metrics::handler(metrics),
        http::Limits::METRICS,
        shutdown(),
    ));
    Ok(())
}
