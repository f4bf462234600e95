//! ztunnel as the enroller sees it: add a workload (with its netns) and wait for the ack,
//! delete one, count connections. The production one is the ZDS server.

use ambient_cni_api::zds::WorkloadInfo;
use iptables_rules::netns::Netns;

use crate::inpod::zds::server::ZdsServer;

/// The connected ztunnels.
#[tonic::async_trait]
pub trait Ztunnel: Send + Sync {
    /// Hands pod `uid` and its netns to ztunnel; `Ok` once ztunnel acked it.
    async fn add_workload(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &Netns,
    ) -> Result<(), String>;
    /// Tells every ztunnel pod `uid` is gone; `Ok` once all acked (or none is connected).
    async fn del_workload(&self, uid: &str) -> Result<(), String>;
    /// Number of connected ztunnels.
    fn connections(&self) -> usize;
}

#[tonic::async_trait]
impl Ztunnel for ZdsServer {
    async fn add_workload(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: &Netns,
    ) -> Result<(), String> {
        ZdsServer::add_workload(self, uid, info, netns)
            .await
            .map_err(|e| e.to_string())
    }
    async fn del_workload(&self, uid: &str) -> Result<(), String> {
        ZdsServer::del_workload(self, uid)
            .await
            .map_err(|e| e.to_string())
    }
    fn connections(&self) -> usize {
        ZdsServer::connections(self)
    }
}
