//! In-pod redirection rules: pure generation and the iptables / nftables backends.
//!
//! [`generate`] builds a backend-neutral [`model::Ruleset`]; [`render`] prints it in
//! Istio's iptables-restore and nft formats; [`backend`] installs it in the current
//! thread's netns; [`redirector::Redirector`] enters a pod netns once and installs the
//! rules together with the policy route ([`route`]).

pub mod backend;
pub mod config;
pub mod constants;
pub mod drift;
pub mod error;
pub mod exec;
pub mod generate;
pub mod kernel_writes;
pub mod model;
pub mod netns;
pub mod nft;
pub mod normalize;
pub mod redirector;
pub mod render;
pub mod route;
pub mod sidecar;
pub mod testing;

pub use backend::{make, BackendKind, Installed, RulesBackend};
pub use config::{HostProbeConfig, InpodConfig};
pub use error::RulesError;
pub use generate::{host_probe_ruleset, inpod_ruleset};
pub use redirector::{Redirector, Report};
