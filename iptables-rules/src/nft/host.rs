//! Host-netns probe SNAT for the nftables backend (reference §2.6): table
//! `inet istio-ambient-nat` with sets `istio-inpod-probes-v4|v6` (element comment = pod UID) and
//! a `postrouting` nat chain SNATing kubelet's (`skuid`) TCP to enrolled pod IPs.
//!
//! Every operation is one atomic transaction on a socket opened in the caller's netns (the
//! caller is on a thread in the host netns).

use std::net::IpAddr;

use super::batch::{Batch, SetElem, SetKey};
use super::consts::NFPROTO_INET;
use super::lower;
use super::socket::NftSocket;
use crate::config::HostProbeConfig;
use crate::constants::{nft::TABLE_NAT, PROBE_SET_V4, PROBE_SET_V6};
use crate::error::nft_err;
use crate::error::RulesError;
use crate::generate::host_probe_ruleset;

/// One enrolled pod IP in a probe set, with the pod UID stored as its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeEntry {
    /// Pod IP.
    pub ip: IpAddr,
    /// Pod UID (the element comment), if any.
    pub uid: Option<String>,
}

/// The host probe rules and sets, managed over netlink.
#[derive(Debug, Clone, Copy, Default)]
pub struct NftHostProbe;

fn key(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn set_of(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => PROBE_SET_V4,
        IpAddr::V6(_) => PROBE_SET_V6,
    }
}

fn ip_of(k: &[u8]) -> Option<IpAddr> {
    match k.len() {
        4 => <[u8; 4]>::try_from(k).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(k).ok().map(IpAddr::from),
        _ => None,
    }
}

fn commit(batch: Batch) -> Result<(), RulesError> {
    let mut sock = NftSocket::open().map_err(nft_err)?;
    sock.commit(batch).map_err(nft_err)
}

impl NftHostProbe {
    /// The install transaction: table, both sets (kept with their elements if present), then
    /// `flush table` and the `postrouting` chain with its rules. Needs `cfg.kubelet_uid`.
    pub fn apply_batch(cfg: &HostProbeConfig) -> Result<Batch, RulesError> {
        if cfg.kubelet_uid.is_none() {
            return Err(RulesError::Config(
                "nftables host probe rules need the kubelet UID (nft has no --socket-exists)"
                    .into(),
            ));
        }
        let tables = lower::lower(&host_probe_ruleset(cfg))?;
        let mut b = Batch::new();
        b.add_table(NFPROTO_INET, TABLE_NAT);
        // Both sets always exist so upserts never depend on the IPv6 setting.
        b.add_set(NFPROTO_INET, TABLE_NAT, PROBE_SET_V4, SetKey::Ipv4Addr);
        b.add_set(NFPROTO_INET, TABLE_NAT, PROBE_SET_V6, SetKey::Ipv6Addr);
        b.flush_table(NFPROTO_INET, TABLE_NAT);
        for t in &tables {
            for c in &t.chains {
                b.add_chain(NFPROTO_INET, &t.name, &c.name, c.base);
            }
            for c in &t.chains {
                for r in &c.rules {
                    b.add_rule(NFPROTO_INET, &t.name, &c.name, r);
                }
            }
        }
        Ok(b)
    }

    /// Installs (or re-installs) the host rules and sets atomically; set elements are kept.
    pub fn apply(&self, cfg: &HostProbeConfig) -> Result<(), RulesError> {
        commit(Self::apply_batch(cfg)?)
    }

    /// Host cleanup on upgrade: flushes the table's rules, keeping sets and their elements.
    pub fn flush_rules(&self) -> Result<(), RulesError> {
        let mut b = Batch::new();
        b.add_table(NFPROTO_INET, TABLE_NAT);
        b.flush_table(NFPROTO_INET, TABLE_NAT);
        commit(b)
    }

    /// Full removal (non-upgrade shutdown): deletes the table with its sets; absent is fine.
    pub fn remove(&self) -> Result<(), RulesError> {
        commit(lower::remove_batch(&[TABLE_NAT]))
    }

    /// The upsert transaction: each IP ends up present with comment `uid`, whatever it held.
    pub fn upsert_batch(uid: &str, ips: &[IpAddr]) -> Batch {
        let mut b = Batch::new();
        Self::add_upsert(&mut b, uid, ips);
        b
    }

    /// Adds or replaces the IPs of every `(uid, ips)` in one transaction (a restart's resync:
    /// one netlink round trip instead of one per pod).
    pub fn upsert_all(&self, pods: &[(String, Vec<IpAddr>)]) -> Result<(), RulesError> {
        let mut b = Batch::new();
        for (uid, ips) in pods {
            Self::add_upsert(&mut b, uid, ips);
        }
        commit(b)
    }

    fn add_upsert(b: &mut Batch, uid: &str, ips: &[IpAddr]) {
        for ip in ips {
            let bare = [SetElem {
                key: key(ip),
                comment: None,
            }];
            let tagged = [SetElem {
                key: key(ip),
                comment: Some(uid.to_owned()),
            }];
            // add (no-op if present) + delete + add: replaces an existing element's comment
            // without failing when it is absent, in one atomic step.
            b.add_elements(NFPROTO_INET, TABLE_NAT, set_of(ip), &bare);
            b.delete_elements(NFPROTO_INET, TABLE_NAT, set_of(ip), &bare);
            b.add_elements(NFPROTO_INET, TABLE_NAT, set_of(ip), &tagged);
        }
    }

    /// Adds or replaces the pod's IPs in the probe sets with comment = `uid`.
    pub fn upsert(&self, uid: &str, ips: &[IpAddr]) -> Result<(), RulesError> {
        commit(Self::upsert_batch(uid, ips))
    }

    /// Lists both probe sets' entries (empty if the table or a set does not exist).
    pub fn entries(&self) -> Result<Vec<ProbeEntry>, RulesError> {
        let mut sock = NftSocket::open().map_err(nft_err)?;
        entries(&mut sock)
    }

    /// The entries of exactly these IPs (absent ones are left out): one GET per IP, not a dump
    /// of the sets, so checking one pod costs the same however many pods are enrolled.
    pub fn lookup(&self, ips: &[IpAddr]) -> Result<Vec<ProbeEntry>, RulesError> {
        let mut sock = NftSocket::open().map_err(nft_err)?;
        let mut out = Vec::new();
        for ip in ips {
            // A missing table or set answers ENOENT too: the IP is then simply not there.
            if let Some(e) = sock
                .get_element(NFPROTO_INET, TABLE_NAT, set_of(ip), &key(ip))
                .map_err(nft_err)?
            {
                out.push(ProbeEntry {
                    ip: *ip,
                    uid: e.comment,
                });
            }
        }
        Ok(out)
    }

    /// Removes every entry whose comment is `uid`; returns the IPs removed.
    pub fn remove_uid(&self, uid: &str) -> Result<Vec<IpAddr>, RulesError> {
        self.remove_where(|e| e.uid.as_deref() == Some(uid))
    }

    /// Removes every entry whose IP is not in `keep` (startup reconcile); returns the IPs removed.
    pub fn prune_except(&self, keep: &[IpAddr]) -> Result<Vec<IpAddr>, RulesError> {
        self.remove_where(|e| !keep.contains(&e.ip))
    }

    fn remove_where(&self, pred: impl Fn(&ProbeEntry) -> bool) -> Result<Vec<IpAddr>, RulesError> {
        let mut sock = NftSocket::open().map_err(nft_err)?;
        let gone: Vec<IpAddr> = entries(&mut sock)?
            .into_iter()
            .filter(|e| pred(e))
            .map(|e| e.ip)
            .collect();
        let mut b = Batch::new();
        for ip in &gone {
            b.delete_elements(
                NFPROTO_INET,
                TABLE_NAT,
                set_of(ip),
                &[SetElem {
                    key: key(ip),
                    comment: None,
                }],
            );
        }
        sock.commit(b).map_err(nft_err)?;
        Ok(gone)
    }
}

fn entries(sock: &mut NftSocket) -> Result<Vec<ProbeEntry>, RulesError> {
    let mut out = Vec::new();
    for set in [PROBE_SET_V4, PROBE_SET_V6] {
        match sock.list_elements(NFPROTO_INET, TABLE_NAT, set) {
            Ok(elems) => out.extend(elems.into_iter().filter_map(|e| {
                Some(ProbeEntry {
                    ip: ip_of(&e.key)?,
                    uid: e.comment,
                })
            })),
            // No table or set yet: nothing enrolled.
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(e) => return Err(nft_err(e)),
        }
    }
    Ok(out)
}
