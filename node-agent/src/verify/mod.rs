//! Drift repair (issue 19): a verifier that keeps every held pod's capture true between
//! ADDs. [`schedule`] decides when each pod is checked, [`pod`] checks and repairs one pod,
//! [`verifier`] runs the loop, [`notify`] sends a pod to it at once when the kernel reports a
//! change in its netns, [`outcome`] is what doctor shows, [`metrics`] counts repairs.

pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod pod;
pub mod schedule;
pub mod verifier;
