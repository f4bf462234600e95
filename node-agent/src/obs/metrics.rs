//! The metrics port's exposition (`:15014/metrics`, OpenMetrics text).
//!
//! Each module that has metrics owns a small struct registered into one
//! [`Registry`] built at start (ztunnel's `inpod/metrics.rs` pattern); this file only
//! serves that registry and runs the scrape hooks that sample live state into gauges.
//! Names Istio's dashboards already use are kept; ours are `ambient_cni_*`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;

use super::http::{self, Handler, HttpError, Reply};

/// The content type of the OpenMetrics text format (Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// The registry every metric of the agent is in, and what runs before each scrape.
pub struct Metrics {
    registry: Registry,
    hooks: RwLock<Vec<ScrapeHook>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Serves `registry` (its metrics registered by their modules beforehand).
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            hooks: RwLock::new(Vec::new()),
        }
    }

    /// Runs `hook` before every scrape (to sample gauges from live state).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// The exposition (OpenMetrics text, ending in `# EOF`).
    pub fn render(&self) -> String {
        for hook in self.hooks.read().unwrap_or_else(|e| e.into_inner()).iter() {
            hook();
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
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
    use ambient_cni_tests::expo;
    use prometheus_client::metrics::gauge::Gauge;

    fn one_gauge() -> (Metrics, Gauge) {
        let mut r = Registry::default();
        let g = Gauge::default();
        r.register("ztunnel_connected", "ztunnel connections", g.clone());
        (Metrics::new(r), g)
    }

    #[test]
    fn scrape_hooks_sample_live_state() {
        let (m, g) = one_gauge();
        let n = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let n2 = n.clone();
        m.on_scrape(move || {
            g.set(n2.load(std::sync::atomic::Ordering::Relaxed));
        });
        let scrape = |m: &Metrics| expo::parse(&m.render()).unwrap();
        assert_eq!(scrape(&m).value("ztunnel_connected", &[]), Some(0.0));
        n.store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(scrape(&m).value("ztunnel_connected", &[]), Some(1.0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scraped_over_http_with_the_openmetrics_content_type() {
        let (m, g) = one_gauge();
        g.set(1);
        let listener = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(http::serve(
            listener,
            "metrics",
            handler(Arc::new(m)),
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
        assert_eq!(e.value("ztunnel_connected", &[]), Some(1.0));
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
