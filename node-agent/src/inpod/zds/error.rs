//! Errors of the ZDS server; each names the connection or socket it concerns.

use std::path::PathBuf;
use std::time::Duration;

use ambient_cni_api::zds::MAX_MESSAGE_LEN;

/// What can go wrong talking to ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// No ztunnel is connected (Istio's exact text, issue #53843).
    #[error("no ztunnel connection")]
    NoConnection,
    /// ztunnel answered with a non-empty `Ack.error`.
    #[error("got ack error: {0}")]
    Nack(String),
    /// No ack (or no room to write) within the deadline.
    #[error("ztunnel connection {conn}: timed out after {after:?} waiting to {what}")]
    Timeout {
        /// Which connection.
        conn: String,
        /// What we were waiting for ("write", "read ack", ...).
        what: &'static str,
        /// The deadline that expired.
        after: Duration,
    },
    /// The encoded message would not fit in one ZDS packet; nothing was sent.
    #[error("ZDS {what}: message is {len} bytes, over the {MAX_MESSAGE_LEN}-byte limit (names too long?)")]
    TooLarge {
        /// The message, e.g. `AddWorkload uid=...`.
        what: String,
        /// Its encoded length.
        len: usize,
    },
    /// A socket call failed on a connection.
    #[error("ztunnel connection {conn}: {op}: {source}")]
    Io {
        /// Which connection.
        conn: String,
        /// The failing operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// ztunnel sent something the protocol does not allow.
    #[error("ztunnel connection {conn}: protocol error: {reason}")]
    Protocol {
        /// Which connection.
        conn: String,
        /// What was wrong.
        reason: String,
    },
    /// The connection went away before the request was answered.
    #[error("ztunnel connection {conn} closed before answering")]
    ConnectionClosed {
        /// Which connection.
        conn: String,
    },
    /// Setting up the listening socket failed.
    #[error("ZDS socket {path}: {op}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The failing operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Several connections failed a broadcast (`DelWorkload`).
    #[error("{}", join(.0))]
    Several(Vec<ZdsError>),
}

fn join(errors: &[ZdsError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ZdsError {
    /// True when retrying later may succeed (everything but an oversize message).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ZdsError::TooLarge { .. })
    }
}
