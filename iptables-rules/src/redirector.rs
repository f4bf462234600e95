//! What the agent calls: enter a pod netns once and install rules + policy route together.

use crate::backend::{BackendKind, Installed, RulesBackend};
use crate::config::InpodConfig;
use crate::drift::{compare_route, Finding};
use crate::error::RulesError;
use crate::netns::Netns;
use crate::route::{self, RouteState};

/// Installs/removes the full in-pod redirection (rules via a backend, plus the policy route).
pub struct Redirector {
    backend: Box<dyn RulesBackend>,
}

/// What `show` found in a netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The netns label.
    pub netns: String,
    /// The backend's view of our rules.
    pub installed: Installed,
    /// The policy route state.
    pub route: RouteState,
    /// True if rules and route both match what `apply(cfg)` installs.
    pub complete: bool,
}

impl Redirector {
    /// Wraps a backend (see [`crate::backend::make`]).
    pub fn new(backend: Box<dyn RulesBackend>) -> Self {
        Self { backend }
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Installs rules then the route in `ns`; if the route fails the rules are removed
    /// again, so the pod is either fully redirected or not at all.
    pub fn apply(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), RulesError> {
        let label = ns.label().to_owned();
        ns.run(|| {
            self.backend.apply(cfg)?;
            if let Err(e) = route::install(cfg.ipv6) {
                // Undo both halves; a rule without its route would blackhole ztunnel's replies.
                let undo = self.backend.remove(cfg).and_then(|()| route::remove());
                return Err(match undo {
                    Ok(()) => e,
                    Err(rollback) => RulesError::Rollback {
                        netns: label.clone(),
                        apply: Box::new(e),
                        rollback: Box::new(rollback),
                    },
                });
            }
            Ok(())
        })?
        .map_err(|e| e.in_netns(&label))
    }

    /// Removes rules and route from `ns`; absent state is not an error.
    pub fn remove(&self, ns: &Netns, cfg: &InpodConfig) -> Result<(), RulesError> {
        let label = ns.label().to_owned();
        ns.run(|| {
            let rules = self.backend.remove(cfg);
            let routes = route::remove();
            rules.and(routes)
        })?
        .map_err(|e| e.in_netns(&label))
    }

    /// Reads back the rules and the policy route in `ns` (no writes) and returns how they differ
    /// from what `apply(cfg)` installs; empty when the capture is exactly in place.
    pub fn verify(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Vec<Finding>, RulesError> {
        let label = ns.label().to_owned();
        ns.run(|| {
            let mut drift = self.backend.drift(cfg)?;
            let st = route::state()?;
            drift.extend(compare_route(
                &st,
                cfg.ipv6,
                route::ipv6_route_wanted(cfg.ipv6),
            ));
            Ok(drift)
        })?
        .map_err(|e: RulesError| e.in_netns(&label))
    }

    /// Reports what is installed in `ns` and whether it is what `apply(cfg)` installs.
    pub fn show(&self, ns: &Netns, cfg: &InpodConfig) -> Result<Report, RulesError> {
        let label = ns.label().to_owned();
        ns.run(|| {
            let installed = self.backend.installed(cfg)?;
            let route = route::state()?;
            let v6_route = route::ipv6_route_wanted(cfg.ipv6);
            let complete = installed.matches_expected && route.is_complete(cfg.ipv6, v6_route);
            Ok(Report {
                netns: label.clone(),
                installed,
                route,
                complete,
            })
        })?
        .map_err(|e: RulesError| e.in_netns(&label))
    }
}
