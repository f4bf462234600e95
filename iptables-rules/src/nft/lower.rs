//! Lowering the backend-neutral [`Ruleset`] to nf_tables objects (`inet` tables, chains, and
//! rules as expression lists), byte-for-byte what `nft` produces for Istio's rule text, so
//! `nft list ruleset` prints the same thing for both.

use std::net::IpAddr;

use super::batch::{BaseChain, Batch, ChainType, Hook};
use super::consts::*;
use super::expr::{CmpOp, CtKey, Expr, MetaKey, NatKind, PayloadBase, Verdict};
use crate::error::RulesError;
use crate::model::{self, Chain, Family, Match, NftChainType, Rule, Ruleset, Table, Target};

/// Register all our values go through (nft uses reg 1 for everything in these rules).
const R1: u32 = NFT_REG_1;
/// Length of an interface-name register value (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// One `inet` table with its chains in creation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    /// Table name.
    pub name: String,
    /// Chains: base chains first (prerouting, output, postrouting), then regular ones.
    pub chains: Vec<NftChain>,
}

/// One chain with its rules in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    /// Chain name.
    pub name: String,
    /// Hook/type/priority for base chains.
    pub base: Option<BaseChain>,
    /// Rules, each as its expression list.
    pub rules: Vec<Vec<Expr>>,
}

/// Order chains are created in (what `nft list` then shows).
const CHAIN_ORDER: [Chain; 6] = [
    Chain::Prerouting,
    Chain::Output,
    Chain::Postrouting,
    Chain::IstioPrert,
    Chain::IstioOutput,
    Chain::IstioPostrt,
];

/// Lowers a ruleset to its `inet` tables (in Istio's table order; tables without rules omitted).
pub fn lower(rs: &Ruleset) -> Result<Vec<NftTable>, RulesError> {
    let mut out = Vec::new();
    for table in rs.tables_in(&Table::NFT_ORDER) {
        let rules: Vec<&Rule> = rs
            .rules
            .iter()
            .filter(|r| r.table == table && r.family.is_none_or(|f| rs.has_family(f)))
            .collect();
        let mut chains = Vec::new();
        for chain in CHAIN_ORDER {
            let used = rules
                .iter()
                .any(|r| r.chain == chain || r.target == Target::Jump(chain));
            if !used {
                continue;
            }
            let mut lowered = Vec::new();
            // Head inserts first (in order), then appends: the chain is rebuilt from empty.
            for r in rules.iter().filter(|r| r.chain == chain && r.insert_first) {
                lowered.push(lower_rule(r)?);
            }
            for r in rules.iter().filter(|r| r.chain == chain && !r.insert_first) {
                lowered.push(lower_rule(r)?);
            }
            chains.push(NftChain {
                name: chain.nft_name().to_owned(),
                base: model::nft_base_chain(table, chain).map(base_chain),
                rules: lowered,
            });
        }
        out.push(NftTable {
            name: table.nft_name().to_owned(),
            chains,
        });
    }
    Ok(out)
}

/// One transaction that makes `tables` the exact content of those tables (nft's
/// `add table; flush table; add chain ...; add rule ...`), and makes each of `absent` not exist
/// (`add table; delete table`, which succeeds whether or not it existed).
pub fn apply_batch(tables: &[NftTable], absent: &[&str]) -> Batch {
    let mut b = Batch::new();
    for t in tables {
        b.add_table(NFPROTO_INET, &t.name);
        b.flush_table(NFPROTO_INET, &t.name);
        for c in &t.chains {
            b.add_chain(NFPROTO_INET, &t.name, &c.name, c.base);
        }
        for c in &t.chains {
            for r in &c.rules {
                b.add_rule(NFPROTO_INET, &t.name, &c.name, r);
            }
        }
    }
    for name in absent {
        b.add_table(NFPROTO_INET, name);
        b.delete_table(NFPROTO_INET, name);
    }
    b
}

/// One transaction removing the named tables whether or not they exist.
pub fn remove_batch(names: &[&str]) -> Batch {
    apply_batch(&[], names)
}

fn base_chain(b: model::NftBaseChain) -> BaseChain {
    let ty = match b.kind {
        NftChainType::Filter => ChainType::Filter,
        NftChainType::Nat => ChainType::Nat,
        NftChainType::Route => ChainType::Route,
    };
    let hook = match b.hook {
        "prerouting" => Hook::Prerouting,
        "input" => Hook::Input,
        "forward" => Hook::Forward,
        "output" => Hook::Output,
        _ => Hook::Postrouting,
    };
    BaseChain {
        ty,
        hook,
        priority: b.priority,
    }
}

/// Lowers one rule: its matches in nft order, then `counter` (except plain jumps) and the target.
pub fn lower_rule(r: &Rule) -> Result<Vec<Expr>, RulesError> {
    let mut e = Vec::new();
    for m in r.nft_matches() {
        lower_match(r, m, &mut e)?;
    }
    if !matches!(r.target, Target::Jump(_)) {
        e.push(Expr::Counter);
    }
    lower_target(r, &mut e)?;
    Ok(e)
}

pub(crate) fn meta_cmp(e: &mut Vec<Expr>, key: MetaKey, op: CmpOp, data: Vec<u8>) {
    e.push(Expr::Meta { key, dreg: R1 });
    e.push(Expr::Cmp { sreg: R1, op, data });
}

/// Compares the 16-bit transport port at `offset` with `port` (`!=` when `neg`).
pub(crate) fn port_cmp(e: &mut Vec<Expr>, offset: u32, port: u16, neg: bool) {
    e.push(Expr::Payload {
        base: PayloadBase::Transport,
        offset,
        len: 2,
        dreg: R1,
    });
    e.push(Expr::Cmp {
        sreg: R1,
        op: op(neg),
        data: port.to_be_bytes().to_vec(),
    });
}

/// `==`, or `!=` when `neg`.
pub(crate) fn op(neg: bool) -> CmpOp {
    if neg {
        CmpOp::Neq
    } else {
        CmpOp::Eq
    }
}

/// `meta nfproto ipv4|ipv6`: the implicit guard nft puts before an IP header load in `inet`.
fn nfproto_guard(e: &mut Vec<Expr>, f: Family) {
    let p = match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    };
    meta_cmp(e, MetaKey::NfProto, CmpOp::Eq, vec![p]);
}

/// Offset of the source (`src = true`) or destination address in the IP header.
fn addr_offset(f: Family, src: bool) -> u32 {
    match (f, src) {
        (Family::V4, true) => 12,
        (Family::V4, false) => 16,
        (Family::V6, true) => 8,
        (Family::V6, false) => 24,
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Compares the network header's `prefix` bits at `offset` with `addr`'s (`!=` when `neg`):
/// loads only the prefix's bytes and masks a partial last byte.
pub(crate) fn prefix_cmp(e: &mut Vec<Expr>, offset: u32, addr: &[u8], prefix: u32, neg: bool) {
    let prefix = prefix.min(addr.len() as u32 * 8);
    let n = prefix.div_ceil(8) as usize;
    e.push(Expr::Payload {
        base: PayloadBase::Network,
        offset,
        len: n as u32,
        dreg: R1,
    });
    let mut want = addr[..n].to_vec();
    if !prefix.is_multiple_of(8) {
        let mut mask = vec![0xffu8; n];
        mask[n - 1] = 0xffu8 << (8 - prefix % 8);
        for (w, m) in want.iter_mut().zip(&mask) {
            *w &= m;
        }
        e.push(Expr::Bitwise {
            sreg: R1,
            dreg: R1,
            mask,
            xor: vec![0; n],
        });
    }
    e.push(Expr::Cmp {
        sreg: R1,
        op: op(neg),
        data: want,
    });
}

/// `ip saddr|daddr [!=] net`: load only the prefix's bytes, mask a partial last byte, compare.
fn addr_match(e: &mut Vec<Expr>, net: &model::Net, neg: bool, src: bool) -> Result<(), RulesError> {
    let f = net.family();
    let prefix = usize::from(net.prefix_len());
    let full = addr_bytes(&net.addr);
    if prefix == 0 || prefix > full.len() * 8 {
        return Err(RulesError::Config(format!(
            "nftables: unsupported address prefix {net}"
        )));
    }
    nfproto_guard(e, f);
    prefix_cmp(e, addr_offset(f, src), &full, prefix as u32, neg);
    Ok(())
}

/// A 32-bit mark under a mask (`meta mark & m == v` / `ct mark & m == v`); the load is pushed by the caller.
fn masked_cmp(e: &mut Vec<Expr>, value: u32, mask: u32, neg: bool) {
    if mask != u32::MAX {
        e.push(Expr::Bitwise {
            sreg: R1,
            dreg: R1,
            mask: mask.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        });
    }
    e.push(Expr::Cmp {
        sreg: R1,
        op: op(neg),
        data: (value & mask).to_ne_bytes().to_vec(),
    });
}

pub(crate) fn ifname(name: &str) -> Result<Vec<u8>, RulesError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(RulesError::Config(format!(
            "nftables: invalid interface name {name:?}"
        )));
    }
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    Ok(v)
}

fn rule_family(r: &Rule, what: &str) -> Result<Family, RulesError> {
    r.family
        .ok_or_else(|| RulesError::Config(format!("nftables: {what} needs a rule family")))
}

fn lower_match(r: &Rule, m: &Match, e: &mut Vec<Expr>) -> Result<(), RulesError> {
    match m {
        Match::Proto(p) => meta_cmp(e, MetaKey::L4Proto, CmpOp::Eq, vec![p.number()]),
        // iptables' bare `-m tcp` has no nft counterpart (the protocol test is already there).
        Match::ProtoModule(_) => {}
        Match::Saddr { net, neg } => addr_match(e, net, *neg, true)?,
        Match::Daddr { net, neg } => addr_match(e, net, *neg, false)?,
        Match::Dport { port, neg } => port_match(r, e, 2, *port, *neg)?,
        Match::Sport { port } => port_match(r, e, 0, *port, false)?,
        Match::Iif(name) => meta_cmp(e, MetaKey::IifName, CmpOp::Eq, ifname(name)?),
        Match::Oif { name, neg } => meta_cmp(e, MetaKey::OifName, op(*neg), ifname(name)?),
        Match::Mark { value, mask, neg } => {
            e.push(Expr::Meta {
                key: MetaKey::Mark,
                dreg: R1,
            });
            masked_cmp(e, *value, *mask, *neg);
        }
        Match::ConnMark { value, mask } => {
            e.push(Expr::Ct {
                key: CtKey::Mark,
                dreg: R1,
            });
            masked_cmp(e, *value, *mask, false);
        }
        Match::SetDaddr(set) => {
            let f = rule_family(r, "a set lookup")?;
            nfproto_guard(e, f);
            e.push(Expr::Payload {
                base: PayloadBase::Network,
                offset: addr_offset(f, false),
                len: match f {
                    Family::V4 => 4,
                    Family::V6 => 16,
                },
                dreg: R1,
            });
            e.push(Expr::Lookup {
                sreg: R1,
                set: set.clone(),
            });
        }
        Match::SocketExists => {
            return Err(RulesError::Config(
                "nftables: no equivalent of `-m owner --socket-exists` (use a kubelet skuid)"
                    .into(),
            ))
        }
        Match::SkUid(uid) => meta_cmp(e, MetaKey::SkUid, CmpOp::Eq, uid.to_ne_bytes().to_vec()),
    }
    Ok(())
}

/// `tcp|udp dport|sport [!=] p`: the rule's `meta l4proto` match is the dependency nft would add.
fn port_match(
    r: &Rule,
    e: &mut Vec<Expr>,
    offset: u32,
    port: u16,
    neg: bool,
) -> Result<(), RulesError> {
    if r.l4proto().is_none() {
        return Err(RulesError::Config(format!(
            "nftables: port match {port} without a protocol match"
        )));
    }
    port_cmp(e, offset, port, neg);
    Ok(())
}

fn lower_target(r: &Rule, e: &mut Vec<Expr>) -> Result<(), RulesError> {
    match &r.target {
        Target::Jump(c) => e.push(Expr::Verdict(Verdict::Jump(c.nft_name().to_owned()))),
        Target::Accept => e.push(Expr::Verdict(Verdict::Accept)),
        Target::Return => e.push(Expr::Verdict(Verdict::Return)),
        Target::Redirect(port) => {
            e.push(Expr::Immediate {
                dreg: R1,
                data: port.to_be_bytes().to_vec(),
            });
            e.push(Expr::Redir {
                reg_proto_min: Some(R1),
                flags: NF_NAT_RANGE_PROTO_SPECIFIED,
            });
        }
        Target::ConnmarkSetXmark { value, mask } => {
            // ctmark = (ctmark & ~mask) ^ value, as CONNMARK --set-xmark.
            e.push(Expr::Ct {
                key: CtKey::Mark,
                dreg: R1,
            });
            e.push(Expr::Bitwise {
                sreg: R1,
                dreg: R1,
                mask: (!mask).to_ne_bytes().to_vec(),
                xor: value.to_ne_bytes().to_vec(),
            });
            e.push(Expr::CtSet {
                key: CtKey::Mark,
                sreg: R1,
            });
        }
        Target::ConnmarkRestore { nfmask, ctmask } => {
            if *nfmask != u32::MAX || *ctmask != u32::MAX {
                return Err(RulesError::Config(format!(
                    "nftables: connmark restore with masks {nfmask:#x}/{ctmask:#x} is not supported (only full masks)"
                )));
            }
            e.push(Expr::Ct {
                key: CtKey::Mark,
                dreg: R1,
            });
            e.push(Expr::MetaSet {
                key: MetaKey::Mark,
                sreg: R1,
            });
        }
        Target::CtZone(z) => {
            e.push(Expr::Immediate {
                dreg: R1,
                data: z.to_ne_bytes().to_vec(),
            });
            e.push(Expr::CtSet {
                key: CtKey::Zone,
                sreg: R1,
            });
        }
        Target::Snat(a) => {
            e.push(Expr::Immediate {
                dreg: R1,
                data: addr_bytes(a),
            });
            e.push(Expr::Nat {
                kind: NatKind::Snat,
                family: match a {
                    IpAddr::V4(_) => NFPROTO_IPV4,
                    IpAddr::V6(_) => NFPROTO_IPV6,
                },
                reg_addr_min: Some(R1),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InpodConfig;
    use crate::generate::inpod_ruleset;

    fn meta(key: MetaKey) -> Expr {
        Expr::Meta { key, dreg: R1 }
    }

    fn cmp(op: CmpOp, data: &[u8]) -> Expr {
        Expr::Cmp {
            sreg: R1,
            op,
            data: data.to_vec(),
        }
    }

    fn mark_and_fff() -> Expr {
        Expr::Bitwise {
            sreg: R1,
            dreg: R1,
            mask: 0xfffu32.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        }
    }

    fn chain<'a>(tables: &'a [NftTable], table: &str, chain: &str) -> &'a NftChain {
        tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.chains.iter().find(|c| c.name == chain))
            .unwrap_or_else(|| panic!("{table} {chain} missing"))
    }

    #[test]
    fn default_ruleset_has_istio_tables_chains_and_rule_counts() {
        let tables = lower(&inpod_ruleset(&InpodConfig::default())).unwrap();
        let names: Vec<_> = tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "istio-ambient-nat",
                "istio-ambient-mangle",
                "istio-ambient-raw"
            ]
        );
        for t in &tables {
            let chains: Vec<_> = t.chains.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(
                chains,
                ["prerouting", "output", "istio-prerouting", "istio-output"],
                "{}",
                t.name
            );
        }
        let counts: Vec<usize> = tables
            .iter()
            .map(|t| t.chains.iter().map(|c| c.rules.len()).sum())
            .collect();
        assert_eq!(counts, [10, 4, 4]);
        let out = chain(&tables, "istio-ambient-mangle", "output")
            .base
            .unwrap();
        assert_eq!(
            (out.ty, out.hook, out.priority),
            (ChainType::Route, Hook::Output, -150)
        );
        let raw = chain(&tables, "istio-ambient-raw", "prerouting")
            .base
            .unwrap();
        assert_eq!((raw.ty, raw.priority), (ChainType::Filter, -300));
        assert_eq!(
            chain(&tables, "istio-ambient-nat", "istio-output").base,
            None
        );
    }

    #[test]
    fn inbound_redirect_is_the_bytecode_nft_emits() {
        // nft: `ip daddr != 127.0.0.1/32 tcp dport != 15008 mark and 0xfff != 0x539 counter redirect to :15006`
        let tables = lower(&inpod_ruleset(&InpodConfig::default())).unwrap();
        let rules = &chain(&tables, "istio-ambient-nat", "istio-prerouting").rules;
        let want = vec![
            meta(MetaKey::NfProto),
            cmp(CmpOp::Eq, &[NFPROTO_IPV4]),
            Expr::Payload {
                base: PayloadBase::Network,
                offset: 16,
                len: 4,
                dreg: R1,
            },
            cmp(CmpOp::Neq, &[127, 0, 0, 1]),
            meta(MetaKey::L4Proto),
            cmp(CmpOp::Eq, &[6]),
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
                dreg: R1,
            },
            cmp(CmpOp::Neq, &15008u16.to_be_bytes()),
            meta(MetaKey::Mark),
            mark_and_fff(),
            cmp(CmpOp::Neq, &0x539u32.to_ne_bytes()),
            Expr::Counter,
            Expr::Immediate {
                dreg: R1,
                data: 15006u16.to_be_bytes().to_vec(),
            },
            Expr::Redir {
                reg_proto_min: Some(R1),
                flags: NF_NAT_RANGE_PROTO_SPECIFIED,
            },
        ];
        assert_eq!(rules[1], want);
    }

    #[test]
    fn mangle_and_raw_targets_are_the_bytecode_nft_emits() {
        let tables = lower(&inpod_ruleset(&InpodConfig::default())).unwrap();
        let pre = &chain(&tables, "istio-ambient-mangle", "istio-prerouting").rules[0];
        assert_eq!(
            pre[pre.len() - 3..],
            [
                Expr::Ct {
                    key: CtKey::Mark,
                    dreg: R1
                },
                Expr::Bitwise {
                    sreg: R1,
                    dreg: R1,
                    mask: 0xffff_f000u32.to_ne_bytes().to_vec(),
                    xor: 0x111u32.to_ne_bytes().to_vec()
                },
                Expr::CtSet {
                    key: CtKey::Mark,
                    sreg: R1
                },
            ]
        );
        let out = &chain(&tables, "istio-ambient-mangle", "istio-output").rules[0];
        assert_eq!(
            out[out.len() - 2..],
            [
                Expr::Ct {
                    key: CtKey::Mark,
                    dreg: R1
                },
                Expr::MetaSet {
                    key: MetaKey::Mark,
                    sreg: R1
                }
            ]
        );
        let zone = &chain(&tables, "istio-ambient-raw", "istio-output").rules[0];
        assert_eq!(
            zone[zone.len() - 2..],
            [
                Expr::Immediate {
                    dreg: R1,
                    data: vec![1, 0]
                },
                Expr::CtSet {
                    key: CtKey::Zone,
                    sreg: R1
                }
            ]
        );
    }

    #[test]
    fn v6_loopback_and_interfaces_and_prefixes() {
        let cfg = InpodConfig {
            ipv6: true,
            virtual_interfaces: vec!["eth1".into()],
            ..InpodConfig::default()
        };
        let tables = lower(&inpod_ruleset(&cfg)).unwrap();
        let pre = &chain(&tables, "istio-ambient-nat", "istio-prerouting").rules;
        let mut eth1 = b"eth1".to_vec();
        eth1.resize(16, 0);
        assert_eq!(pre[0][..2], [meta(MetaKey::IifName), cmp(CmpOp::Eq, &eth1)]);
        assert_eq!(pre[1].last(), Some(&Expr::Verdict(Verdict::Return)));
        let v6_redirect = &pre[5];
        assert_eq!(v6_redirect[1], cmp(CmpOp::Eq, &[NFPROTO_IPV6]));
        assert_eq!(
            v6_redirect[2],
            Expr::Payload {
                base: PayloadBase::Network,
                offset: 24,
                len: 16,
                dreg: R1
            }
        );

        // A /20 loads 3 bytes and masks the last nibble, as nft does.
        let mut e = Vec::new();
        let net = model::Net {
            addr: "10.1.16.0".parse().unwrap(),
            prefix: Some(20),
        };
        addr_match(&mut e, &net, false, true).unwrap();
        assert_eq!(
            e[2],
            Expr::Payload {
                base: PayloadBase::Network,
                offset: 12,
                len: 3,
                dreg: R1
            }
        );
        assert_eq!(
            e[3],
            Expr::Bitwise {
                sreg: R1,
                dreg: R1,
                mask: vec![0xff, 0xff, 0xf0],
                xor: vec![0; 3]
            }
        );
        assert_eq!(e[4], cmp(CmpOp::Eq, &[10, 1, 16]));
    }

    #[test]
    fn bad_input_is_a_config_error() {
        let cfg = InpodConfig {
            virtual_interfaces: vec!["x".repeat(16)],
            ..InpodConfig::default()
        };
        assert!(matches!(
            lower(&inpod_ruleset(&cfg)),
            Err(RulesError::Config(_))
        ));
        let r = Rule::new(
            Some(Family::V4),
            Table::Nat,
            Chain::IstioOutput,
            vec![Match::Dport {
                port: 53,
                neg: false,
            }],
            Target::Accept,
        );
        assert!(matches!(lower_rule(&r), Err(RulesError::Config(_))));
        let r = Rule::new(
            Some(Family::V4),
            Table::Nat,
            Chain::IstioPostrt,
            vec![Match::SocketExists],
            Target::Accept,
        );
        assert!(matches!(lower_rule(&r), Err(RulesError::Config(_))));
    }

    #[test]
    fn dns_off_transaction_deletes_the_raw_table() {
        let cfg = InpodConfig {
            dns_capture: false,
            ..InpodConfig::default()
        };
        let tables = lower(&inpod_ruleset(&cfg)).unwrap();
        assert_eq!(tables.len(), 2);
        let b = apply_batch(&tables, &["istio-ambient-raw"]);
        let (_, msgs) = b.finish();
        let labels: Vec<_> = msgs.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            labels[labels.len() - 2..],
            [
                "add table inet istio-ambient-raw",
                "delete table inet istio-ambient-raw"
            ]
        );
        assert_eq!(
            labels[..2],
            [
                "add table inet istio-ambient-nat",
                "flush table inet istio-ambient-nat"
            ]
        );
    }
}
