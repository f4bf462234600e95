//! What the plugin asks the node agent, independent of the transport.

use ambient_cni_api::plugin as pb;

/// Why an agent exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// The agent could not be reached (socket missing, refused): it does not answer.
    Unavailable(String),
    /// The agent answered that it cannot take the pod now (starting, no ztunnel): retry.
    Busy(String),
    /// The agent did not answer within the time budget.
    Timeout(u64),
    /// The agent answered with an error (e.g. ztunnel nacked the pod).
    Refused(String),
    /// The agent's answer was not the protocol.
    Protocol(String),
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(e) => write!(f, "node agent unreachable: {e}"),
            Self::Busy(e) => write!(f, "node agent cannot take the pod now: {e}"),
            Self::Timeout(ms) => write!(f, "node agent did not answer within {ms} ms"),
            Self::Refused(e) => write!(f, "node agent refused: {e}"),
            Self::Protocol(e) => write!(f, "node agent protocol error: {e}"),
        }
    }
}

/// The agent, as the plugin sees it (a trait so the command logic is testable without sockets).
pub trait Agent {
    /// ADD.
    fn add(&self, req: pb::AddRequest) -> Result<pb::AddResponse, AgentError>;
    /// DEL.
    fn del(&self, req: pb::DelRequest) -> Result<pb::DelResponse, AgentError>;
    /// CHECK.
    fn check(&self, req: pb::CheckRequest) -> Result<pb::CheckResponse, AgentError>;
    /// STATUS.
    fn status(&self, req: pb::StatusRequest) -> Result<pb::StatusResponse, AgentError>;
    /// GC.
    fn gc(&self, req: pb::GcRequest) -> Result<pb::GcResponse, AgentError>;
    /// The agent's decisions file; read only when the agent does not answer.
    fn decisions(&self) -> Result<Vec<u8>, String> {
        Err("no decisions file".into())
    }
    /// Counts one fallback where the agent will see it (best effort; `pass_through` or failed closed).
    fn record_fallback(&self, _pass_through: bool) -> Result<(), String> {
        Ok(())
    }
}
