//! The agent client: tonic gRPC over the agent's Unix socket.
//!
//! A current-thread tokio runtime lives for one exchange; the whole exchange
//! (connect + HTTP/2 handshake + call) is bounded by `timeout_ms`.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use ambient_cni_api::decisions;
use ambient_cni_api::plugin as pb;
use ambient_cni_api::plugin::plugin_client::PluginClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::agent::{Agent, AgentError};

/// A client bound to one socket path and time budget.
#[derive(Debug, Clone)]
pub struct GrpcAgent {
    socket: String,
    timeout: Duration,
}

impl GrpcAgent {
    /// A client for `socket` with `timeout_ms` per exchange.
    pub fn new(socket: impl Into<String>, timeout_ms: u64) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn exchange<T, F, Fut>(&self, call: F) -> Result<T, AgentError>
    where
        F: FnOnce(PluginClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| AgentError::Unavailable(format!("cannot start runtime: {e}")))?;
        let socket = self.socket.clone();
        let budget = self.timeout;
        rt.block_on(async move {
            let work = async move {
                let channel = connect(socket).await?;
                call(PluginClient::new(channel))
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(classify_status)
            };
            match tokio::time::timeout(budget, work).await {
                Ok(r) => r,
                Err(_) => Err(AgentError::Timeout(budget.as_millis() as u64)),
            }
        })
    }
}

async fn connect(socket: String) -> Result<Channel, AgentError> {
    // The URI is required by tonic but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://ambient-cni-agent.local");
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket)
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("connect {socket}: {e}")))?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(classify_transport)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> (String, bool) {
    let mut text = e.to_string();
    let mut io = false;
    let mut cur = e.source();
    while let Some(s) = cur {
        io |= s.is::<std::io::Error>();
        let part = s.to_string();
        // Wrappers often repeat their source's text; say each thing once.
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = s.source();
    }
    (text, io)
}

fn classify_transport(e: tonic::transport::Error) -> AgentError {
    let (text, io) = error_chain(&e);
    if io {
        AgentError::Unavailable(text)
    } else {
        AgentError::Protocol(text)
    }
}

fn classify_status(s: tonic::Status) -> AgentError {
    use tonic::Code;
    let msg = s.message().to_owned();
    match s.code() {
        // Retryable: the agent is up but cannot take the pod now (e.g. no ztunnel).
        // An answer, so never a reason to fall back on the decisions file.
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::DeadlineExceeded
        | Code::Cancelled => AgentError::Busy(msg),
        // Our agent never answers these on purpose: a broken or foreign peer.
        Code::Unknown | Code::Internal | Code::Unimplemented | Code::DataLoss => {
            AgentError::Protocol(format!("{:?}: {msg}", s.code()))
        }
        _ => AgentError::Refused(msg),
    }
}

impl Agent for GrpcAgent {
    fn add(&self, req: pb::AddRequest) -> Result<pb::AddResponse, AgentError> {
        self.exchange(|mut c| async move { c.add(req).await })
    }
    fn del(&self, req: pb::DelRequest) -> Result<pb::DelResponse, AgentError> {
        self.exchange(|mut c| async move { c.del(req).await })
    }
    fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, AgentError> {
        self.exchange(|mut c| async move { c.check(req).await })
    }
    fn status(&self, req: pb::StatusRequest) -> Result<pb::StatusResponse, AgentError> {
        self.exchange(|mut c| async move { c.status(req).await })
    }
    fn gc(&self, req: pb::GcRequest) -> Result<pb::GcResponse, AgentError> {
        self.exchange(|mut c| async move { c.gc(req).await })
    }
    fn decisions(&self) -> Result<Vec<u8>, String> {
        let path = decisions::file_beside(Path::new(&self.socket));
        crate::local_files::read_trusted(&path, decisions::MAX_BYTES)
    }
    fn record_fallback(&self, pass_through: bool) -> Result<(), String> {
        let byte = if pass_through {
            decisions::FALLBACK_PASS_THROUGH
        } else {
            decisions::FALLBACK_FAIL_CLOSED
        };
        let path = decisions::fallbacks_beside(Path::new(&self.socket));
        crate::local_files::append_byte(&path, byte, decisions::MAX_FALLBACKS_BYTES)
    }
}
