//! The small HTTP/1.1 server behind the health and metrics ports (hyper 1, GET/HEAD
//! only, one handler and one set of [`Limits`] per port).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::conns::ConnTable;

/// Per-port connection limits of [`serve`]: nothing a client holds open can keep a new
/// connection from being served (see [`super::conns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live connections at most; a new one past the cap closes the oldest.
    pub max_connections: usize,
    /// Request headers must arrive within this, also between keep-alive requests.
    pub header_timeout: Duration,
    /// A connection is closed (gracefully) at this age however busy it is.
    pub max_age: Duration,
    /// Whether a connection stays open for further requests.
    pub keep_alive: bool,
}

impl Limits {
    /// The health port: kubelet probes open one connection per probe (1 s timeout by
    /// default), so one request per connection and a short header timeout.
    pub const HEALTH: Limits = Limits {
        max_connections: 32,
        header_timeout: Duration::from_secs(2),
        max_age: Duration::from_secs(10),
        keep_alive: false,
    };
    /// The metrics port: scrapers keep their connection between scrapes (15-60 s apart).
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(10),
        max_age: Duration::from_secs(120),
        keep_alive: true,
    };
}

/// Request head buffer per connection (hyper's floor is 8 KiB); our paths are short.
const MAX_BUF: usize = 16 * 1024;

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

/// Serves `handler` on `listener` within `limits` until `shutdown` resolves (then stops
/// accepting; requests in flight finish on their own tasks).
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    handler: Handler,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let table = Arc::new(Mutex::new(ConnTable::new(limits.max_connections)));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{name} server listening");
    }
    tokio::pin!(shutdown);
    loop {
        // Accept at once, always: a connection left in the backlog is one nobody can serve.
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
        let (close, closed) = oneshot::channel::<()>();
        let (id, evicted) = table.lock().unwrap_or_else(|e| e.into_inner()).admit(close);
        if !evicted.is_empty() {
            debug!(%peer, "{name} server: at {} connections, closing the oldest", limits.max_connections);
        }
        for c in evicted {
            let _ = c.send(());
        }
        let (handler, table) = (handler.clone(), table.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, name, handler, limits, closed).await;
            table.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        });
    }
    info!("{name} server stopped");
}

/// One connection until it ends, `closed` fires (evicted), or it reaches `limits.max_age`.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: &'static str,
    handler: Handler,
    limits: Limits,
    closed: oneshot::Receiver<()>,
) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = respond(req.method(), req.uri().path(), &handler);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(limits.keep_alive)
        .max_buf_size(MAX_BUF)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        // Dropping the connection closes the socket.
        _ = closed => return,
        _ = tokio::time::sleep(limits.max_age) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.header_timeout, conn).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = res {
        debug!(%peer, error = %e, "{name} server: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

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
        let server = tokio::spawn(serve(listener, "test", handler, Limits::METRICS, async {
            let _ = stopped.await;
        }));
        let (ok, missing, raw_post, raw_head) = tokio::task::spawn_blocking(move || {
            let raw = |req: &str| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
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

    /// Serves `/x` within `limits` on a loopback port until the returned sender is dropped.
    async fn start(limits: Limits) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|p: &str| match p {
            "/x" => Reply::text(200, "ok\n"),
            other => Reply::not_found(other),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, "test", handler, limits, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Whether the server closed `s` (EOF or reset) within `limit`.
    fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> bool {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_connections_cannot_starve_a_new_one() {
        let (addr, _stop) = start(Limits::HEALTH).await;
        let slowest = tokio::task::spawn_blocking(move || {
            // Far more than the cap: idle ones, and ones stuck half-way through their headers.
            let mut held = Vec::new();
            for i in 0..500 {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                if i % 5 == 0 {
                    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n").unwrap();
                }
                held.push(s);
            }
            let mut slowest = Duration::ZERO;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                let got = get(addr, "/x", Duration::from_secs(5)).unwrap();
                assert_eq!(got, (200, "ok\n".into()));
                slowest = slowest.max(t.elapsed());
            }
            drop(held);
            slowest
        })
        .await
        .unwrap();
        assert!(
            slowest < Duration::from_millis(100),
            "a GET took {slowest:?} while connections were held"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_idle_keep_alive_connections_are_closed() {
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_millis(300),
            max_age: Duration::from_secs(60),
            keep_alive: true,
        };
        let (addr, _stop) = start(limits).await;
        tokio::task::spawn_blocking(move || {
            // Says nothing: closed after the header timeout.
            let mut silent = std::net::TcpStream::connect(addr).unwrap();
            let t = std::time::Instant::now();
            assert!(closed_within(&mut silent, Duration::from_secs(3)));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            // One request, then idle on a kept-alive connection: closed after the header timeout.
            let mut idle = std::net::TcpStream::connect(addr).unwrap();
            idle.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 512];
            let n = idle.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            assert!(closed_within(&mut idle, Duration::from_secs(3)));
        })
        .await
        .unwrap();
        // A connection past its age is closed however busy it is.
        let aged = Limits {
            max_age: Duration::from_millis(300),
            ..limits
        };
        let (addr, _stop) = start(aged).await;
        tokio::task::spawn_blocking(move || {
            let mut busy = std::net::TcpStream::connect(addr).unwrap();
            let t = std::time::Instant::now();
            let mut buf = [0u8; 512];
            let mut ended = false;
            while t.elapsed() < Duration::from_secs(3) {
                let sent = busy.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
                if sent.is_err() || matches!(busy.read(&mut buf), Ok(0) | Err(_)) {
                    ended = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(ended, "a busy connection outlived its max age");
        })
        .await
        .unwrap();
    }
}
