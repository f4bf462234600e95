//! The plugin socket: gRPC (`ambient_cni.plugin.v1`) over a root-only Unix socket.
//!
//! The socket file is 0600 and every accepted peer's uid is checked with
//! `SO_PEERCRED`, so only root on this node can ask for a pod to be captured.

use std::sync::Arc;

use ambient_cni_api::plugin as pb;
use ambient_cni_api::plugin::plugin_server::{Plugin, PluginServer};
use tokio::net::UnixListener;
use tonic::{Request, Response, Status};
use tracing::info;

pub mod metrics;

use metrics::{add_result, outcome, PluginMetrics};

/// What the agent does with plugin requests (the enrolment pipeline implements it).
#[tonic::async_trait]
pub trait PodHandler: Send + Sync + 'static {
    /// ADD: capture the pod or say it is not in the mesh.
    async fn add(&self, req: pb::AddRequest) -> Result<pb::Decision, Status>;
    /// DEL: forget the sandbox (best effort).
    async fn del(&self, req: pb::DelRequest) -> Result<(), Status>;
    /// CHECK: is the pod's redirection in place?
    async fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, Status>;
    /// STATUS: ready to capture pods?
    fn ready(&self) -> (bool, String);
    /// GC: the runtime's valid attachments.
    async fn gc(&self, req: pb::GcRequest) -> Result<(), Status>;
}

/// The handler before any pod source exists: nothing is in the mesh.
#[derive(Debug, Default)]
pub struct NotInMesh;

#[tonic::async_trait]
impl PodHandler for NotInMesh {
    async fn add(&self, _: pb::AddRequest) -> Result<pb::Decision, Status> {
        Ok(pb::Decision::NotInMesh)
    }
    async fn del(&self, _: pb::DelRequest) -> Result<(), Status> {
        Ok(())
    }
    async fn check(&self, _: pb::CheckRequest) -> Result<pb::CheckResponse, Status> {
        Ok(pb::CheckResponse {
            ok: true,
            message: String::new(),
        })
    }
    fn ready(&self) -> (bool, String) {
        (true, String::new())
    }
    async fn gc(&self, _: pb::GcRequest) -> Result<(), Status> {
        Ok(())
    }
}

/// Refuses requests of a protocol version we do not speak.
fn check_version(v: i32) -> Result<(), Status> {
    if v == pb::ProtocolVersion::ProtocolVersion1 as i32 {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "plugin protocol version {v} not supported by this agent (speaks 1): \
             the plugin binary and the agent are from different releases"
        )))
    }
}

struct Service<H> {
    handler: Arc<H>,
    metrics: Arc<PluginMetrics>,
}

#[tonic::async_trait]
impl<H: PodHandler> Plugin for Service<H> {
    async fn add(&self, req: Request<pb::AddRequest>) -> Result<Response<pb::AddResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let started = std::time::Instant::now();
        let res = self.handler.add(req).await;
        self.metrics.add_latency(started.elapsed());
        self.metrics.request("ADD", add_result(&res));
        let decision = res?;
        Ok(Response::new(pb::AddResponse {
            decision: decision as i32,
            message: String::new(),
        }))
    }

    async fn del(&self, req: Request<pb::DelRequest>) -> Result<Response<pb::DelResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let res = self.handler.del(req).await;
        self.metrics.request("DEL", outcome(&res, |_| true));
        res?;
        Ok(Response::new(pb::DelResponse {}))
    }

    async fn check(
        &self,
        req: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let res = self.handler.check(req).await;
        self.metrics.request("CHECK", outcome(&res, |r| r.ok));
        Ok(Response::new(res?))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        check_version(req.into_inner().protocol_version)?;
        let (ready, message) = self.handler.ready();
        self.metrics.request("STATUS", outcome(&Ok(ready), |r| *r));
        Ok(Response::new(pb::StatusResponse { ready, message }))
    }

    async fn gc(&self, req: Request<pb::GcRequest>) -> Result<Response<pb::GcResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let res = self.handler.gc(req).await;
        self.metrics.request("GC", outcome(&res, |_| true));
        res?;
        Ok(Response::new(pb::GcResponse {}))
    }
}

pub use crate::uds::{bind, SocketError};

/// Serves plugin requests until `shutdown` resolves, counting them in `metrics`; peers whose
/// uid is not `allowed_uid` are dropped.
pub async fn serve<H: PodHandler>(
    listener: UnixListener,
    handler: Arc<H>,
    metrics: Arc<PluginMetrics>,
    allowed_uid: u32,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = crate::uds::peers_with_uid(listener, allowed_uid, "plugin");
    info!("plugin socket serving");
    tonic::transport::Server::builder()
        .add_service(PluginServer::new(Service { handler, metrics }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
