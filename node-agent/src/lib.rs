//! The ambient-cni node agent: enrols pods into the ambient mesh and hands them to ztunnel.

pub mod cmd;
pub mod discovery;
pub mod inpod;
