//! The enrolment pipeline: which pods the agent holds, and how one enters or leaves the mesh.

pub mod controller;
pub mod doctor;
pub mod enroller;
#[cfg(test)]
pub mod fakes;
pub mod hooks;
pub mod host_probe;
pub mod metrics;
pub mod netns;
pub mod persist;
pub mod policy;
pub mod rebuild;
pub mod rules;
pub mod sidecar;
pub mod sidecar_metrics;
pub mod sidecar_policy;
pub mod status_queue;
pub mod table;
pub mod ztunnel;
