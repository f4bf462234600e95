//! The small HTTP/1.1 server behind the health and metrics ports (hyper 1, GET/HEAD
//! only, one handler per port).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// Concurrent connections per port; scrapers and kubelet probes need a handful.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this (slow clients cannot pin connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler answers for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// A `text/plain` reply.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// 404 for a path the port does not serve.
    pub fn not_found(path: &str) -> Self {
        Self::text(404, format!("no such path: {path}\n"))
    }
}

/// Maps a request path to a reply; called for GET and HEAD.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// Errors of the HTTP server; each names the address.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds a TCP listener on `addr` (port 0 picks a free port; see `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

fn respond(method: &Method, path: &str, handler: &Handler) -> Response<Full<Bytes>> {
    let reply = match *method {
        Method::GET | Method::HEAD => handler(path),
        _ => Reply::text(405, "only GET and HEAD\n"),
    };
    let body = if *method == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(reply.body)
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if reply.status == 405 {
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

/// Serves `handler` on `listener` until `shutdown` resolves (then stops accepting;
/// requests in flight finish on their own tasks).
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    handler: Handler,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{name} server listening");
    }
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "{name} server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(req.method(), req.uri().path(), &handler);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "{name} server: connection ended with an error");
            }
        });
    }
    info!("{name} server stopped");
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    // The GET client lives in the development crate: the agent only serves HTTP.
    use ambient_cni_tests::http::get;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_get_head_and_refuses_other_methods() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|p: &str| match p {
            "/x" => Reply::text(200, "hello\n"),
            other => Reply::not_found(other),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, "test", handler, async {
            let _ = stopped.await;
        }));
        let (ok, missing, raw_post, raw_head) = tokio::task::spawn_blocking(move || {
            let raw = |req: &str| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(req.as_bytes()).unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                out
            };
            (
                get(addr, "/x", Duration::from_secs(5)).unwrap(),
                get(addr, "/nope", Duration::from_secs(5)).unwrap(),
                raw("POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n"),
                raw("HEAD /x HTTP/1.0\r\n\r\n"),
            )
        })
        .await
        .unwrap();
        assert_eq!(ok, (200, "hello\n".into()));
        assert_eq!(missing.0, 404);
        assert!(raw_post.starts_with("HTTP/1.0 405"), "{raw_post}");
        assert!(
            raw_post.to_ascii_lowercase().contains("allow: get, head"),
            "{raw_post}"
        );
        assert!(raw_head.starts_with("HTTP/1.0 200"), "{raw_head}");
        assert!(
            raw_head.ends_with("\r\n\r\n"),
            "HEAD has no body: {raw_head:?}"
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
