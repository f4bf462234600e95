//! Subcommands of `ambient-cni-agent` that are more than wiring.
pub mod redirect;
pub mod validate_sidecar;
