//! Native nftables backend: the in-pod ruleset as three `inet` tables
//! (`istio-ambient-nat|mangle|raw`, reference §4.6), installed in ONE atomic nf_tables
//! transaction over netlink (no `nft` process), read back by netlink dumps.
//!
//! Apply is `add table; flush table; add chain ...; add rule ...` per table with rules, plus
//! `add table; delete table` for our tables without rules (e.g. raw with DNS capture off), so
//! re-applying with a different config converges and a failed transaction leaves the previous
//! state untouched (the kernel aborts it whole).

use crate::backend::{BackendKind, Installed, InstalledSection, RulesBackend};
use crate::config::InpodConfig;
use crate::drift::{compare_sections, Finding};
use crate::error::RulesError;
use crate::generate::inpod_ruleset;
use crate::model::{Ruleset, Table};
use crate::nft::consts::NFPROTO_INET;
use crate::nft::lower::{self, NftTable};
use crate::nft::{Batch, NftError, NftSocket};

/// Builds the nftables backend.
pub fn make() -> Result<Box<dyn RulesBackend>, RulesError> {
    Ok(Box::new(NftablesBackend))
}

/// The native nf_tables backend (stateless: every call opens its own socket in the caller's netns).
#[derive(Debug, Clone, Copy, Default)]
pub struct NftablesBackend;

/// Names of all our in-pod tables.
fn our_tables() -> [&'static str; 3] {
    Table::NFT_ORDER.map(Table::nft_name)
}

pub(crate) use crate::error::nft_err;

impl NftablesBackend {
    /// Makes `rs` the exact content of our tables in the current netns, atomically.
    pub fn apply_ruleset(&self, rs: &Ruleset) -> Result<(), RulesError> {
        let batch = Self::batch_for(rs)?;
        let mut sock = NftSocket::open().map_err(nft_err)?;
        sock.commit(batch).map_err(nft_err)
    }

    /// The transaction [`NftablesBackend::apply_ruleset`] sends (exposed for benches and tests).
    pub fn batch_for(rs: &Ruleset) -> Result<Batch, RulesError> {
        let tables = lower::lower(rs)?;
        let absent: Vec<&str> = our_tables()
            .into_iter()
            .filter(|n| !tables.iter().any(|t| t.name == *n))
            .collect();
        Ok(lower::apply_batch(&tables, &absent))
    }

    /// Reads our tables back from the kernel (those that exist), in our table order.
    pub fn read_tables(&self) -> Result<Vec<NftTable>, RulesError> {
        let mut sock = NftSocket::open().map_err(nft_err)?;
        read_tables(&mut sock).map_err(nft_err)
    }
}

/// Two dumps for the whole `inet` family (chains, then rules) rather than three per table: the
/// drift verifier reads every held pod this way each interval. A table of ours without chains
/// (hooks nothing) is not reported.
fn read_tables(sock: &mut NftSocket) -> Result<Vec<NftTable>, NftError> {
    sock.read_family_tables(NFPROTO_INET, our_tables())
}

/// The differences of `actual` from `expected` (which differ), as text findings.
fn diff(expected: &[NftTable], actual: &[NftTable]) -> Vec<Finding> {
    let mut drift = compare_sections(&sections_of(expected), &sections_of(actual));
    if drift.is_empty() {
        // The text lines print every field; this only guards against a future blind spot.
        drift.push(Finding::SectionExtra {
            section: "inet (differs from the expected tables)".into(),
        });
    }
    drift
}

/// Each table as a section named `inet <table>` with its [`table_lines`].
fn sections_of(tables: &[NftTable]) -> Vec<InstalledSection> {
    tables
        .iter()
        .map(|t| InstalledSection {
            name: format!("inet {}", t.name),
            lines: table_lines(t),
        })
        .collect()
}

/// Text lines of one table: chain headers and rules (normalized: no handles or counter values).
pub fn table_lines(t: &NftTable) -> Vec<String> {
    let mut lines = Vec::new();
    for c in &t.chains {
        match &c.base {
            Some(b) => lines.push(format!(
                "chain {} {{ type {} hook {:?} priority {} }}",
                c.name,
                b.ty.as_str(),
                b.hook,
                b.priority
            )),
            None => lines.push(format!("chain {}", c.name)),
        }
        for r in &c.rules {
            let exprs: Vec<String> = r.iter().map(ToString::to_string).collect();
            lines.push(format!("  {} {}", c.name, exprs.join(" ")));
        }
    }
    lines
}

impl RulesBackend for NftablesBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }

    fn apply(&self, cfg: &InpodConfig) -> Result<(), RulesError> {
        self.apply_ruleset(&inpod_ruleset(cfg))
    }

    fn remove(&self, _cfg: &InpodConfig) -> Result<(), RulesError> {
        let mut sock = NftSocket::open().map_err(nft_err)?;
        sock.commit(lower::remove_batch(&our_tables()))
            .map_err(nft_err)
    }

    fn drift(&self, cfg: &InpodConfig) -> Result<Vec<Finding>, RulesError> {
        let expected = lower::lower(&inpod_ruleset(cfg))?;
        let actual = self.read_tables()?;
        // Text lines only for a report: the common, clean case compares structures.
        if actual == expected {
            return Ok(Vec::new());
        }
        Ok(diff(&expected, &actual))
    }

    fn installed(&self, cfg: &InpodConfig) -> Result<Installed, RulesError> {
        let expected = lower::lower(&inpod_ruleset(cfg))?;
        let actual = self.read_tables()?;
        let sections = sections_of(&actual);
        let matches_expected = actual == expected;
        let drift = if matches_expected {
            Vec::new()
        } else {
            diff(&expected, &actual)
        };
        Ok(Installed {
            backend: BackendKind::Nftables,
            sections,
            matches_expected,
            drift,
        })
    }
}
