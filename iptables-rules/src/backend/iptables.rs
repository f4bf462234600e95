//! iptables backend: one `iptables-restore --noflush` batch per family, exec'd with
//! arguments (no shell) on the caller's thread, which is inside the pod netns.
//!
//! Idempotent and all-or-nothing: the current state is read with `*-save` first;
//! if ours is already exactly in place nothing is written; otherwise one batch
//! re-declares (flushes) our chains, deletes our existing jumps and adds the ruleset.
//! `iptables-restore` commits per table, so a batch failing in a later table is undone
//! by a second batch that restores the saved state.

use crate::backend::{BackendKind, Installed, InstalledSection, RulesBackend};
use crate::config::InpodConfig;
use crate::drift::{compare_sections, Finding};
use crate::error::RulesError;
use crate::exec;
use crate::generate::inpod_ruleset;
use crate::model::{Family, Rule, Ruleset, Table};
use crate::normalize;
use crate::render;

/// Env var that forces the binary (Istio's `FORCE_IPTABLES_BINARY`), e.g. `iptables-legacy`.
pub const FORCE_ENV: &str = "FORCE_IPTABLES_BINARY";

/// Which iptables implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `iptables-legacy` (x_tables; takes the xtables lock).
    Legacy,
    /// `iptables-nft` (nf_tables compat tables).
    Nft,
    /// Plain `iptables`, whatever it is.
    Plain,
}

/// The binaries of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// e.g. `iptables-nft`.
    pub bin: String,
    /// e.g. `iptables-nft-save`.
    pub save: String,
    /// e.g. `iptables-nft-restore`.
    pub restore: String,
}

impl Tools {
    /// `bin`, `bin-save` and `bin-restore`.
    pub fn new(bin: &str) -> Self {
        Self {
            bin: bin.to_owned(),
            save: format!("{bin}-save"),
            restore: format!("{bin}-restore"),
        }
    }
}

/// Per-table state: table name and its normalized lines (see [`normalize::iptables_save`]).
type TableLines = Vec<(String, Vec<String>)>;

/// The iptables backend with the binaries chosen once by [`Iptables::detect`].
#[derive(Debug, Clone)]
pub struct Iptables {
    flavor: Flavor,
    v4: Tools,
    v6: Option<Tools>,
}

impl Iptables {
    /// Picks the binaries like Istio (§4.4): `FORCE_IPTABLES_BINARY`; else legacy if
    /// `iptables-legacy-save` shows rules; else `iptables-nft` if usable; else `iptables`.
    /// Run once at start, in the host netns (the legacy check looks at the host's rules).
    pub fn detect() -> Result<Self, RulesError> {
        if let Ok(forced) = std::env::var(FORCE_ENV) {
            if !forced.is_empty() {
                let flavor = if forced.contains("legacy") {
                    Flavor::Legacy
                } else if forced.contains("nft") {
                    Flavor::Nft
                } else {
                    Flavor::Plain
                };
                return Ok(Self::with_binary(flavor, &forced));
            }
        }
        if legacy_has_rules() {
            return Ok(Self::with_binary(Flavor::Legacy, "iptables-legacy"));
        }
        if usable("iptables-nft") {
            return Ok(Self::with_binary(Flavor::Nft, "iptables-nft"));
        }
        if usable("iptables") {
            return Ok(Self::with_binary(Flavor::Plain, "iptables"));
        }
        Err(RulesError::NotAvailable {
            backend: "iptables".into(),
            reason: "no usable iptables binary (tried iptables-legacy, iptables-nft, iptables)"
                .into(),
        })
    }

    /// Uses `bin` (`iptables`, `iptables-nft`, `iptables-legacy`) and its ip6tables twin.
    /// IPv6 is marked unavailable if the twin's save tool does not run.
    pub fn with_binary(flavor: Flavor, bin: &str) -> Self {
        let v6bin = bin.replacen("iptables", "ip6tables", 1);
        let v6 = Tools::new(&v6bin);
        let v6_ok = exec::run(&v6bin, &v6.save, &["--version"], None).is_ok();
        Self {
            flavor,
            v4: Tools::new(bin),
            v6: v6_ok.then_some(v6),
        }
    }

    /// Explicit binaries per family (benches, and tests that need a family's tool to fail).
    pub fn with_tools(flavor: Flavor, v4: Tools, v6: Option<Tools>) -> Self {
        Self { flavor, v4, v6 }
    }

    /// The flavor in use.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The binaries of a family (None: IPv6 tools unusable).
    pub fn tools(&self, family: Family) -> Option<&Tools> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref(),
        }
    }

    fn tools_for(&self, family: Family) -> Result<&Tools, RulesError> {
        self.tools(family).ok_or_else(|| RulesError::NotAvailable {
            backend: self.v4.bin.replacen("iptables", "ip6tables", 1),
            reason: "ip6tables tools do not run; cannot install IPv6 rules".into(),
        })
    }

    /// Our current state for a family (empty if none).
    fn current(&self, family: Family) -> Result<TableLines, RulesError> {
        let t = self.tools_for(family)?;
        if !self.may_have_state(family) {
            return Ok(Vec::new());
        }
        let text = exec::run(&t.bin, &t.save, &[], None)?;
        Ok(normalize::iptables_save(&text))
    }

    /// False only if none of the tables we use exists in this netns for `family`, which
    /// makes `*-save` pointless (a fresh pod then costs one exec, the restore). Asked of
    /// the kernel directly: nf_tables table list for iptables-nft, `/proc/thread-self/net`
    /// for legacy. Any doubt answers true.
    pub(crate) fn may_have_state(&self, family: Family) -> bool {
        const OURS: [&str; 3] = ["mangle", "nat", "raw"];
        match self.flavor {
            Flavor::Nft => {
                let proto = match family {
                    Family::V4 => crate::nft::consts::NFPROTO_IPV4,
                    Family::V6 => crate::nft::consts::NFPROTO_IPV6,
                };
                crate::nft::NftSocket::open()
                    .and_then(|mut s| s.list_tables(proto))
                    .map(|tables| tables.iter().any(|t| OURS.contains(&t.as_str())))
                    .unwrap_or(true)
            }
            Flavor::Legacy => {
                let file = match family {
                    Family::V4 => "/proc/thread-self/net/ip_tables_names",
                    Family::V6 => "/proc/thread-self/net/ip6_tables_names",
                };
                std::fs::read_to_string(file)
                    .map(|names| names.lines().any(|t| OURS.contains(&t.trim())))
                    .unwrap_or(true)
            }
            Flavor::Plain => true,
        }
    }

    fn restore(&self, family: Family, text: &str) -> Result<(), RulesError> {
        let t = self.tools_for(family)?;
        let mut args = vec!["--noflush"];
        if self.flavor == Flavor::Legacy {
            // Legacy serializes writers on /run/xtables.lock (Istio uses --wait=30).
            args.extend(["--wait", "30"]);
        }
        exec::run(&t.bin, &t.restore, &args, Some(text.as_bytes())).map(|_| ())
    }

    /// Installs an arbitrary ruleset (what [`RulesBackend::apply`] does for `inpod_ruleset(cfg)`).
    /// Families of the tools present but not in `rs` get our leftovers removed.
    pub fn apply_ruleset(&self, rs: &Ruleset) -> Result<(), RulesError> {
        let mut done: Vec<(Family, TableLines)> = Vec::new();
        for family in [Family::V4, Family::V6] {
            let wanted = rs.has_family(family);
            if !wanted && self.tools(family).is_none() {
                continue;
            }
            let before = self.current(family)?;
            let expected = render::iptables_save_expected(rs, family);
            if before == expected {
                continue;
            }
            let target = if wanted {
                istio_lines(rs, family)
            } else {
                Vec::new()
            };
            let batch = transition(&before, &target);
            if let Err(e) = self.restore(family, &batch) {
                done.push((family, before));
                return Err(self.rollback(e, done));
            }
            done.push((family, before));
        }
        Ok(())
    }

    /// Puts every touched family back to its saved state after `err`.
    fn rollback(&self, err: RulesError, done: Vec<(Family, TableLines)>) -> RulesError {
        for (family, before) in done.into_iter().rev() {
            let undo = self.current(family).and_then(|now| {
                self.restore(family, &transition(&now, &before))?;
                if before.is_empty() && self.flavor == Flavor::Nft {
                    self.drop_empty_compat_tables(family)?;
                }
                Ok(())
            });
            if let Err(rb) = undo {
                return RulesError::Rollback {
                    netns: "current".into(),
                    apply: Box::new(err),
                    rollback: Box::new(rb),
                };
            }
        }
        err
    }

    /// Removes our chains and jumps from every family with tools.
    pub fn remove_all(&self) -> Result<(), RulesError> {
        for family in [Family::V4, Family::V6] {
            if self.tools(family).is_none() {
                continue;
            }
            let now = self.current(family)?;
            if !now.is_empty() {
                self.restore(family, &transition(&now, &[]))?;
                if self.flavor == Flavor::Nft {
                    self.drop_empty_compat_tables(family)?;
                }
            }
        }
        Ok(())
    }

    /// iptables-nft leaves the `ip nat`/`mangle`/`raw` tables it created (empty built-in
    /// chains still hooked, e.g. keeping NAT active). Deletes those that hold no rule, in
    /// one nft batch whose `delete chain` fails (EBUSY, whole batch aborted) should a rule
    /// appear meanwhile, so nobody else's rule can be lost.
    pub(crate) fn drop_empty_compat_tables(&self, family: Family) -> Result<(), RulesError> {
        let nft_family = match family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        let text = exec::run("nft", "nft", &["list", "ruleset", nft_family], None)?;
        let mut batch = String::new();
        for (table, chains, rules) in nft_tables(&text) {
            if ["mangle", "nat", "raw"].contains(&table.as_str()) && rules == 0 {
                for c in &chains {
                    batch.push_str(&format!("delete chain {nft_family} {table} {c}\n"));
                }
                batch.push_str(&format!("delete table {nft_family} {table}\n"));
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        exec::run("nft", "nft", &["-f", "-"], Some(batch.as_bytes())).map(|_| ())
    }
}

/// Per table in `nft list ruleset` output: (table, chains, rule count). Only chains with the
/// default `policy accept` count as empty; anything else is counted as a rule.
fn nft_tables(text: &str) -> Vec<(String, Vec<String>, usize)> {
    let mut out: Vec<(String, Vec<String>, usize)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            let name = rest.split_whitespace().nth(1).unwrap_or("").to_owned();
            out.push((name, Vec::new(), 0));
        } else if let Some(cur) = out.last_mut() {
            if let Some(rest) = line.strip_prefix("chain ") {
                cur.1.push(rest.trim_end_matches('{').trim().to_owned());
            } else if line.is_empty()
                || line == "}"
                || (line.starts_with("type ") && line.ends_with("policy accept;"))
            {
            } else {
                cur.2 += 1;
            }
        }
    }
    out
}

/// The ruleset's lines in Istio's text per table (restore accepts these as they are).
fn istio_lines(rs: &Ruleset, family: Family) -> TableLines {
    let mut out = Vec::new();
    for table in Table::ALL {
        let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
        if rules.is_empty() {
            continue;
        }
        let mut lines: Vec<String> = render::declared_chains(&rules)
            .into_iter()
            .map(|c| format!(":{}", c.iptables_name()))
            .collect();
        lines.extend(rules.iter().map(|r| render::iptables_rule_line(r)));
        out.push((table.iptables_name().to_owned(), lines));
    }
    out
}

/// One restore batch turning our state `from` into `to` (both per table: `:CHAIN`
/// declarations and `-A`/`-I` lines). Declaring a chain under `--noflush` creates or
/// flushes it; existing jumps into our chains are deleted before the new ones are added,
/// and chains no longer wanted are deleted after.
pub fn transition(from: &[(String, Vec<String>)], to: &[(String, Vec<String>)]) -> String {
    let mut tables: Vec<&str> = from.iter().chain(to).map(|(t, _)| t.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let lines_of = |set: &'_ [(String, Vec<String>)], t: &str| -> Vec<String> {
        set.iter()
            .filter(|(n, _)| n == t)
            .flat_map(|(_, l)| l.clone())
            .collect()
    };
    let mut out = String::new();
    for t in tables {
        let old = lines_of(from, t);
        let new = lines_of(to, t);
        let chains = |ls: &[String]| -> Vec<String> {
            ls.iter()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|c| c.to_owned())
                .collect()
        };
        let old_chains = chains(&old);
        let new_chains = chains(&new);
        out.push_str(&format!("*{t}\n"));
        for c in old_chains
            .iter()
            .chain(&new_chains)
            .fold(Vec::<&String>::new(), |mut acc, c| {
                if !acc.contains(&c) {
                    acc.push(c);
                }
                acc
            })
        {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        // Jumps from built-in chains survive a flush of ours: delete them explicitly.
        for l in &old {
            if let Some(rest) = l.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or("");
                if !old_chains.iter().any(|c| c == chain) {
                    out.push_str(&format!("-D {rest}\n"));
                }
            }
        }
        for c in &old_chains {
            if !new_chains.contains(c) {
                out.push_str(&format!("-X {c}\n"));
            }
        }
        for l in new.iter().filter(|l| !l.starts_with(':')) {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

impl RulesBackend for Iptables {
    fn kind(&self) -> BackendKind {
        BackendKind::Iptables
    }

    fn apply(&self, cfg: &InpodConfig) -> Result<(), RulesError> {
        cfg.validate()?;
        if cfg.ipv6 {
            self.tools_for(Family::V6)?;
        }
        self.apply_ruleset(&inpod_ruleset(cfg))
    }

    fn remove(&self, _cfg: &InpodConfig) -> Result<(), RulesError> {
        self.remove_all()
    }

    fn installed(&self, cfg: &InpodConfig) -> Result<Installed, RulesError> {
        let rs = inpod_ruleset(cfg);
        let mut sections = Vec::new();
        let mut matches_expected = true;
        let mut drift = Vec::new();
        let named = |family: Family, tables: TableLines| -> Vec<InstalledSection> {
            tables
                .into_iter()
                .map(|(table, lines)| InstalledSection {
                    name: format!("{} {table}", family_name(family)),
                    lines,
                })
                .collect()
        };
        for family in [Family::V4, Family::V6] {
            let expected = render::iptables_save_expected(&rs, family);
            if self.tools(family).is_none() {
                if rs.has_family(family) {
                    matches_expected = false;
                    drift.extend(named(family, expected).into_iter().map(|s| {
                        Finding::SectionMissing {
                            section: format!("{} (no ip6tables tools)", s.name),
                        }
                    }));
                }
                continue;
            }
            let now = self.current(family)?;
            if now != expected {
                matches_expected = false;
            }
            let now = named(family, now);
            drift.extend(compare_sections(&named(family, expected), &now));
            sections.extend(now);
        }
        Ok(Installed {
            backend: BackendKind::Iptables,
            sections,
            matches_expected,
            drift,
        })
    }
}

/// True if `iptables-legacy-save` (host netns) shows at least 3 rules: the host uses legacy.
fn legacy_has_rules() -> bool {
    exec::run("iptables-legacy", "iptables-legacy-save", &[], None)
        .map(|out| out.lines().filter(|l| l.starts_with("-A")).count() >= 3)
        .unwrap_or(false)
}

/// True if `bin-save` runs and a test rule can be added and deleted. The probe runs in a
/// throw-away netns when one can be made, so the host's tables are not touched.
fn usable(bin: &str) -> bool {
    let save = format!("{bin}-save");
    if exec::run(bin, &save, &["--version"], None).is_err() {
        return false;
    }
    let bin_owned = bin.to_owned();
    let probe = move || {
        // The `iptables` crate runs the single-rule commands; fine off the per-pod path.
        let ipt = iptables::IPTables {
            cmd: Box::leak(bin_owned.into_boxed_str()),
            has_check: true,
            has_wait: false,
            is_numeric: true,
        };
        let rule = "-p 255 -j RETURN";
        ipt.append("nat", "INPUT", rule).is_ok() && ipt.delete("nat", "INPUT", rule).is_ok()
    };
    std::thread::spawn(move || {
        // A fresh netns for the probe; if that is not permitted, probe where we are (as Istio does).
        let _ = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET);
        probe()
    })
    .join()
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, lines: &[&str]) -> (String, Vec<String>) {
        (
            name.to_owned(),
            lines.iter().map(|l| l.to_string()).collect(),
        )
    }

    #[test]
    fn transition_from_nothing_declares_then_adds() {
        let to = [t(
            "nat",
            &[
                ":ISTIO_PRERT",
                "-A PREROUTING -j ISTIO_PRERT",
                "-A ISTIO_PRERT -j ACCEPT",
            ],
        )];
        assert_eq!(
            transition(&[], &to),
            "*nat\n:ISTIO_PRERT - [0:0]\n-A PREROUTING -j ISTIO_PRERT\n-A ISTIO_PRERT -j ACCEPT\nCOMMIT\n"
        );
    }

    #[test]
    fn transition_replaces_jumps_and_drops_unwanted_chains() {
        let from = [
            t(
                "nat",
                &[
                    ":ISTIO_PRERT",
                    "-A PREROUTING -j ISTIO_PRERT",
                    "-A ISTIO_PRERT -j ACCEPT",
                ],
            ),
            t("raw", &[":ISTIO_OUTPUT", "-A OUTPUT -j ISTIO_OUTPUT"]),
        ];
        let to = [t("nat", &[":ISTIO_PRERT", "-A PREROUTING -j ISTIO_PRERT"])];
        assert_eq!(
            transition(&from, &to),
            "*nat\n:ISTIO_PRERT - [0:0]\n-D PREROUTING -j ISTIO_PRERT\n-A PREROUTING -j ISTIO_PRERT\nCOMMIT\n\
             *raw\n:ISTIO_OUTPUT - [0:0]\n-D OUTPUT -j ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
        );
    }
}
