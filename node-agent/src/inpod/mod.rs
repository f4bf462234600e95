//! In-pod mode: netns handling, the ZDS server for ztunnel, and its state.

pub mod zds;
