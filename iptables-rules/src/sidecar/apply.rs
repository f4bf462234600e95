//! Effects: installing a [`SidecarConfig`] in a pod netns with the iptables backend.
//!
//! Per family: read our state with `*-save`; when it already equals what the config
//! leaves, nothing is written; else one `iptables-restore --noflush` batch turns the old
//! state into the new one (our chains re-declared, old jumps deleted, Istio's rules
//! added; atomic per table). A failure in a later family or in the TPROXY route puts
//! every family written so far back as it was, so a pod never keeps half a config.

use super::canon::{expected_state, state_from_save, TableLines};
use super::generate::{self, declared_chains, Rule, TABLES};
use super::route;
use super::{Applied, Mode, SidecarConfig};
use crate::backend::iptables::{transition, Flavor, Iptables, Tools};
use crate::error::RulesError;
use crate::exec;
use crate::model::Family;
use crate::netns::Netns;

/// What one family should hold for `cfg` (None: the family is not wanted).
fn wanted<'a>(cfg: &SidecarConfig, family: Family, rules: &'a [Rule]) -> Option<&'a [Rule]> {
    (family == Family::V4 || cfg.ipv6).then_some(rules)
}

/// Installs `cfg` in `ns` (all or nothing); see the module doc.
pub fn apply_iptables(
    ipt: &Iptables,
    ns: &Netns,
    cfg: &SidecarConfig,
) -> Result<Applied, RulesError> {
    let label = where_(ns, cfg);
    ns.run(|| apply_here(ipt, cfg))
        .map_err(RulesError::from)
        .and_then(|r| r)
        .map_err(|e| e.in_netns(&label))
}

/// True when exactly `cfg`'s rules (and TPROXY route) are in `ns`.
pub fn matches_iptables(
    ipt: &Iptables,
    ns: &Netns,
    cfg: &SidecarConfig,
) -> Result<bool, RulesError> {
    let label = where_(ns, cfg);
    ns.run(|| matches_here(ipt, cfg))
        .map_err(RulesError::from)
        .and_then(|r| r)
        .map_err(|e| e.in_netns(&label))
}

/// `<netns> (pod <ns/name>)`, for errors.
fn where_(ns: &Netns, cfg: &SidecarConfig) -> String {
    format!("{} (pod {})", ns.label(), cfg.pod)
}

fn matches_here(ipt: &Iptables, cfg: &SidecarConfig) -> Result<bool, RulesError> {
    let (v4, v6) = generate::rules(cfg);
    for (family, rules) in [(Family::V4, &v4), (Family::V6, &v6)] {
        let want = wanted(cfg, family, rules);
        let Some(tools) = ipt.tools(family) else {
            if want.is_some() {
                return Ok(false);
            }
            continue;
        };
        let expected = want.map(|r| expected_state(r, family)).unwrap_or_default();
        if current(ipt, tools, family)? != expected {
            return Ok(false);
        }
    }
    if cfg.mode == Mode::Tproxy {
        return route::is_complete(cfg.ipv6);
    }
    Ok(true)
}

fn apply_here(ipt: &Iptables, cfg: &SidecarConfig) -> Result<Applied, RulesError> {
    let (v4, v6) = generate::rules(cfg);
    let mut done: Vec<(Family, TableLines)> = Vec::new();
    for (family, rules) in [(Family::V4, &v4), (Family::V6, &v6)] {
        let want = wanted(cfg, family, rules);
        let Some(tools) = ipt.tools(family) else {
            if want.is_some() {
                return Err(undo(
                    ipt,
                    RulesError::NotAvailable {
                        backend: "ip6tables".into(),
                        reason: "ip6tables tools do not run; cannot install the pod's IPv6 rules"
                            .into(),
                    },
                    done,
                ));
            }
            continue;
        };
        let before = current(ipt, tools, family)?;
        let expected = want.map(|r| expected_state(r, family)).unwrap_or_default();
        if before == expected {
            continue;
        }
        let target = want.map(restore_lines).unwrap_or_default();
        let res = restore(ipt, tools, &transition(&before, &target));
        done.push((family, before));
        if let Err(e) = res {
            return Err(undo(ipt, e, done));
        }
    }
    let mut wrote = !done.is_empty();
    if cfg.mode == Mode::Tproxy && !route::is_complete(cfg.ipv6)? {
        if let Err(e) = route::install(cfg.ipv6) {
            let e = match route::remove() {
                Ok(()) => e,
                Err(rb) => RulesError::Rollback {
                    netns: "current".into(),
                    apply: Box::new(e),
                    rollback: Box::new(rb),
                },
            };
            return Err(undo(ipt, e, done));
        }
        wrote = true;
    }
    if cfg.ipv6 && wrote {
        if let Err(e) = route::add_inbound_v6_source() {
            return Err(undo(ipt, e, done));
        }
    }
    Ok(if wrote {
        Applied::Installed
    } else {
        Applied::AlreadyPresent
    })
}

/// Puts each family touched so far (the failed one included: `iptables-restore` commits
/// per table) back to its saved state after `err`; every family is tried.
fn undo(ipt: &Iptables, err: RulesError, done: Vec<(Family, TableLines)>) -> RulesError {
    let mut failed = None;
    for (family, before) in done.into_iter().rev() {
        let Some(tools) = ipt.tools(family) else {
            continue;
        };
        let back = current(ipt, tools, family).and_then(|now| {
            if now == before {
                return Ok(());
            }
            restore(ipt, tools, &transition(&now, &before))?;
            if before.is_empty() && ipt.flavor() == Flavor::Nft {
                // iptables-nft leaves the tables it created; a fresh netns had none.
                ipt.drop_empty_compat_tables(family)?;
            }
            Ok(())
        });
        if let Err(rb) = back {
            failed.get_or_insert(rb);
        }
    }
    match failed {
        None => err,
        Some(rb) => RulesError::Rollback {
            netns: "current".into(),
            apply: Box::new(err),
            rollback: Box::new(rb),
        },
    }
}

/// Our state for a family; skips the `*-save` exec when none of our tables exists.
fn current(ipt: &Iptables, tools: &Tools, family: Family) -> Result<TableLines, RulesError> {
    if !ipt.may_have_state(family) {
        return Ok(Vec::new());
    }
    let text = exec::run(&tools.bin, &tools.save, &[], None)?;
    Ok(state_from_save(&text))
}

fn restore(ipt: &Iptables, tools: &Tools, text: &str) -> Result<(), RulesError> {
    let mut args = vec!["--noflush"];
    if ipt.flavor() == Flavor::Legacy {
        // Legacy serializes writers on /run/xtables.lock (Istio waits too).
        args.extend(["--wait", "30"]);
    }
    exec::run(&tools.bin, &tools.restore, &args, Some(text.as_bytes())).map(|_| ())
}

/// Istio's rules per table as [`transition`] takes them: `:CHAIN` then its `-A`/`-I` lines.
fn restore_lines(rules: &[Rule]) -> TableLines {
    let decls = declared_chains(rules);
    let mut out = Vec::new();
    for table in TABLES {
        let mut lines: Vec<String> = decls
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| format!(":{c}"))
            .collect();
        lines.extend(rules.iter().filter(|r| r.table == table).map(Rule::line));
        if !lines.is_empty() {
            out.push((table.to_owned(), lines));
        }
    }
    out
}
