//! The in-pod rules as the enroller sees them: apply, remove and show in one pod netns.
//! The production rules are [`Redirector`] (iptables or nftables, plus the policy route).

use iptables_rules::config::InpodConfig;
use iptables_rules::drift::Finding;
use iptables_rules::netns::Netns;
use iptables_rules::redirector::{Redirector, Report};

/// Installs, removes and reports the in-pod redirection (blocking: call off the runtime workers).
pub trait PodRules: Send + Sync {
    /// The backend's name (`iptables` | `nftables`), a metrics label.
    fn backend(&self) -> &'static str;
    /// Installs the rules and route in `ns`, all or nothing.
    fn apply(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), String>;
    /// Removes them (absent is fine).
    fn remove(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), String>;
    /// What is installed in `ns`, and whether it is what `apply(cfg)` installs.
    fn show(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Report, String>;
    /// How the rules and route in `ns` differ from what `apply(cfg)` installs, read back
    /// without writing (the drift verifier's check). By default from [`PodRules::show`].
    fn verify(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Vec<Finding>, String> {
        self.show(ns, cfg).map(|r| {
            if r.complete {
                Vec::new()
            } else {
                vec![Finding::SectionMissing {
                    section: "in-pod rules or policy route".into(),
                }]
            }
        })
    }
}

impl PodRules for Redirector {
    fn backend(&self) -> &'static str {
        self.kind().as_str()
    }
    fn apply(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), String> {
        Redirector::apply(self, ns, cfg).map_err(|e| e.to_string())
    }
    fn remove(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), String> {
        Redirector::remove(self, ns, cfg).map_err(|e| e.to_string())
    }
    fn show(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Report, String> {
        Redirector::show(self, ns, cfg).map_err(|e| e.to_string())
    }
    fn verify(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Vec<Finding>, String> {
        Redirector::verify(self, ns, cfg).map_err(|e| e.to_string())
    }
}
