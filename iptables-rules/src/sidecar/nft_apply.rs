//! Effects: installing a [`SidecarConfig`] with the native nftables backend, in one atomic
//! nf_tables transaction over netlink (no `nft` process); "already installed" is decided by
//! reading our tables back and comparing them with the lowered rules.

use super::generate;
use super::nft::{apply_batch, lower, nfproto, TABLES};
use super::route;
use super::{Applied, Mode, SidecarConfig};
use crate::error::nft_err;
use crate::error::RulesError;
use crate::model::Family;
use crate::netns::Netns;
use crate::nft::lower::NftTable;
use crate::nft::NftSocket;

/// What our tables should hold, per family (IPv6 empty unless the config is IPv6).
fn wanted(cfg: &SidecarConfig) -> Result<Vec<(Family, Vec<NftTable>)>, RulesError> {
    let (v4, v6) = generate::rules(cfg);
    Ok(vec![
        (Family::V4, lower(&v4, Family::V4)?),
        (Family::V6, lower(&v6, Family::V6)?),
    ])
}

/// Installs `cfg` in `ns` (all or nothing; a no-op when exactly these tables are there).
pub fn apply_nft(ns: &Netns, cfg: &SidecarConfig) -> Result<Applied, RulesError> {
    let label = format!("{} (pod {})", ns.label(), cfg.pod);
    ns.run(|| apply_here(cfg))
        .map_err(RulesError::from)
        .and_then(|r| r)
        .map_err(|e| e.in_netns(&label))
}

/// True when exactly `cfg`'s tables (and TPROXY route) are in `ns`.
pub fn matches_nft(ns: &Netns, cfg: &SidecarConfig) -> Result<bool, RulesError> {
    let label = format!("{} (pod {})", ns.label(), cfg.pod);
    ns.run(|| -> Result<bool, RulesError> {
        let want = wanted(cfg)?;
        let mut sock = NftSocket::open().map_err(nft_err)?;
        Ok(tables_match(&mut sock, &want)? && route_ok(cfg)?)
    })
    .map_err(RulesError::from)
    .and_then(|r| r)
    .map_err(|e| e.in_netns(&label))
}

fn route_ok(cfg: &SidecarConfig) -> Result<bool, RulesError> {
    Ok(cfg.mode != Mode::Tproxy || route::is_complete(cfg.ipv6)?)
}

fn tables_match(
    sock: &mut NftSocket,
    want: &[(Family, Vec<NftTable>)],
) -> Result<bool, RulesError> {
    for (family, tables) in want {
        if read(sock, *family)? != *tables {
            return Ok(false);
        }
    }
    Ok(true)
}

fn apply_here(cfg: &SidecarConfig) -> Result<Applied, RulesError> {
    let want = wanted(cfg)?;
    let mut sock = NftSocket::open().map_err(nft_err)?;
    let before = vec![
        (Family::V4, read(&mut sock, Family::V4)?),
        (Family::V6, read(&mut sock, Family::V6)?),
    ];
    let mut wrote = false;
    if before != want {
        sock.commit(apply_batch(&want)).map_err(nft_err)?;
        wrote = true;
    }
    if !route_ok(cfg)? {
        if let Err(e) = route::install(cfg.ipv6) {
            // Back to the tables that were there (the kernel aborts a failed batch whole).
            let rb = route::remove().and_then(|()| {
                if !wrote {
                    return Ok(());
                }
                let mut s = NftSocket::open().map_err(nft_err)?;
                s.commit(apply_batch(&before)).map_err(nft_err)
            });
            return Err(match rb {
                Ok(()) => e,
                Err(rb) => RulesError::Rollback {
                    netns: "current".into(),
                    apply: Box::new(e),
                    rollback: Box::new(rb),
                },
            });
        }
        wrote = true;
    }
    if cfg.ipv6 && wrote {
        route::add_inbound_v6_source()?;
    }
    Ok(if wrote {
        Applied::Installed
    } else {
        Applied::AlreadyPresent
    })
}

/// Our tables as the kernel holds them, per family.
pub fn read(sock: &mut NftSocket, family: Family) -> Result<Vec<NftTable>, RulesError> {
    let fam = nfproto(family);
    let err = nft_err;
    sock.read_family_tables(fam, TABLES.iter().map(|(_, name)| *name))
        .map_err(err)
}
