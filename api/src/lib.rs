//! Wire types shared by the plugin, the node agent and ztunnel.
//!
//! Kept apart so the short-lived plugin links only these types, never the agent.

/// ZDS, the agent <-> ztunnel protocol (package `istio.workload.zds`).
pub mod zds {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));

    /// Largest ZDS message either side accepts (one message per packet).
    pub const MAX_MESSAGE_LEN: usize = 1024;

    /// One place for ZDS on the wire: SOCK_SEQPACKET packets with an optional fd.
    #[cfg(feature = "socket")]
    pub mod socket;
}

/// The plugin <-> agent protocol (package `ambient_cni.plugin.v1`).
pub mod plugin {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ambient_cni.plugin.v1.rs"));
}

/// The agent's admin API (package `ambient_cni.admin.v1`).
pub mod admin {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ambient_cni.admin.v1.rs"));
}

/// The agent's decisions file, read by the plugin only when the agent does not answer.
pub mod decisions;
