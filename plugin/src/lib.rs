//! The ambient-cni CNI plugin: chained last, it hands each pod to the node agent.
//!
//! Pure logic (conf, env, result conversion, pass-through decisions) lives apart
//! from the one effect, the agent exchange, so it is testable without sockets.

pub mod agent;
pub mod client;
pub mod cmd;
pub mod conf;
pub mod decide;
pub mod env;
pub mod error;
pub mod fallback;
pub mod local_files;
pub mod log;
pub mod result;
pub mod version;
