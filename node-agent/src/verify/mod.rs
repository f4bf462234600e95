//! Drift repair (issue 19): a verifier that keeps every held pod's capture true between
//! ADDs. [`schedule`] decides when each pod is checked.

pub mod schedule;
