//! ZDS: the server ztunnel connects to (SOCK_SEQPACKET, protobuf, netns fd via SCM_RIGHTS).
//!
//! Wire-compatible with stock ztunnel (ztunnel's `proto/zds.proto` and `src/inpod/`): one message per
//! packet, at most 1024 bytes, the netns fd only on `AddWorkload`, strict
//! request/ack lock-step per connection. The packet I/O itself is `ambient_cni_api::zds::socket`,
//! shared with the ztunnel stand-in and the tests.

pub mod config;
pub(crate) mod connection;
pub mod error;
pub(crate) mod listener;
pub mod message;
pub mod server;
pub mod snapshot;

pub use config::ZdsConfig;
pub use connection::SnapshotStats;
pub use error::ZdsError;
pub use listener::DEFAULT_ZDS_SOCKET;
pub use server::ZdsServer;
pub use snapshot::{SnapshotEntry, SnapshotSource};
