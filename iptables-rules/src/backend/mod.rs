//! Rule backends: the same [`crate::model::Ruleset`] installed via iptables or native nftables.
//!
//! Every method runs on a thread that is already inside the target netns (the caller
//! uses [`crate::netns::Netns::run`]); a backend never enters a netns itself.

use std::fmt;
use std::str::FromStr;

use crate::config::InpodConfig;
use crate::drift::Finding;
use crate::error::RulesError;

pub mod iptables;
pub mod nftables;

/// Which backend installs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `iptables-restore` (legacy or nf_tables flavour, detected once).
    Iptables,
    /// Native nf_tables over netlink (`inet istio-ambient-*` tables).
    Nftables,
}

impl BackendKind {
    /// Both kinds, iptables first.
    pub const ALL: [BackendKind; 2] = [BackendKind::Iptables, BackendKind::Nftables];

    /// The name used on the command line and in config.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Iptables => "iptables",
            BackendKind::Nftables => "nftables",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = RulesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(BackendKind::Iptables),
            "nftables" => Ok(BackendKind::Nftables),
            other => Err(RulesError::Config(format!(
                "unknown rules backend {other:?} (expected iptables or nftables)"
            ))),
        }
    }
}

pub use crate::drift::InstalledSection;

/// What a backend finds of our rules in the current netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Which backend looked.
    pub backend: BackendKind,
    /// Our state, per table/family; empty sections are omitted.
    pub sections: Vec<InstalledSection>,
    /// True if exactly the ruleset for the given config is installed.
    pub matches_expected: bool,
    /// How our state differs from the ruleset for the given config (empty when it matches).
    pub drift: Vec<Finding>,
}

impl Installed {
    /// True if none of our rules or chains are present.
    pub fn is_empty(&self) -> bool {
        self.sections.iter().all(|s| s.lines.is_empty())
    }
}

/// Installs and removes the in-pod ruleset in the current thread's netns.
pub trait RulesBackend: Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Installs the ruleset for `cfg`: atomic (all or nothing; the previous state is
    /// kept on failure) and idempotent (re-applying leaves one copy, replacing ours).
    fn apply(&self, cfg: &InpodConfig) -> Result<(), RulesError>;
    /// Removes our rules and chains; absent state is not an error.
    fn remove(&self, cfg: &InpodConfig) -> Result<(), RulesError>;
    /// Reports our installed state and whether it equals the ruleset for `cfg`.
    fn installed(&self, cfg: &InpodConfig) -> Result<Installed, RulesError>;
    /// How our installed state differs from the ruleset for `cfg` (empty: exactly in place).
    /// Read-only; what the drift verifier calls for every held pod, so backends may skip
    /// building [`Installed::sections`] when nothing differs.
    fn drift(&self, cfg: &InpodConfig) -> Result<Vec<Finding>, RulesError> {
        Ok(self.installed(cfg)?.drift)
    }
}

/// Builds a backend of `kind` (iptables: detects the flavour now, in the caller's netns).
pub fn make(kind: BackendKind) -> Result<Box<dyn RulesBackend>, RulesError> {
    match kind {
        BackendKind::Iptables => Ok(Box::new(iptables::Iptables::detect()?)),
        BackendKind::Nftables => nftables::make(),
    }
}
