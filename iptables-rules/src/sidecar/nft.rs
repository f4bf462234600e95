//! The native nftables form of Istio's sidecar rules: each family's rules (the same list the
//! iptables backend restores) lowered to nf_tables expressions in tables of our own,
//! `ip|ip6 istio-proxy-nat|mangle|raw` (Istio's sidecar nft table names; never the
//! `istio-ambient-*` ones). Pure; [`super::nft_apply`] installs them.

use std::net::IpAddr;

use super::canon::chain_contents;
use super::generate::{declared_chains, Rule};
use crate::error::RulesError;
use crate::model::Family;
use crate::nft::consts::*;
use crate::nft::lower::{ifname, meta_cmp, NftChain, NftTable};
use crate::nft::{
    BaseChain, Batch, ChainType, CmpOp, CtKey, Expr, Hook, MetaKey, PayloadBase, Verdict,
};

/// Our table names, in Istio's nft order (nat, mangle, raw).
pub const TABLES: [(&str, &str); 3] = [
    ("nat", "istio-proxy-nat"),
    ("mangle", "istio-proxy-mangle"),
    ("raw", "istio-proxy-raw"),
];

const R1: u32 = NFT_REG_1;

/// The nf_tables family number of `f`.
pub fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

/// Istio's nft name of an iptables chain (`ISTIO_IN_REDIRECT` → `istio-in-redirect`).
pub fn chain_name(ipt: &str) -> String {
    ipt.to_ascii_lowercase().replace('_', "-")
}

fn base_chain(table: &str, chain: &str) -> Option<BaseChain> {
    let hook = match chain {
        "PREROUTING" => Hook::Prerouting,
        "OUTPUT" => Hook::Output,
        _ => return None,
    };
    let (ty, priority) = match (table, hook) {
        ("nat", _) => (ChainType::Nat, -100),
        ("mangle", Hook::Output) => (ChainType::Route, -150),
        ("mangle", _) => (ChainType::Filter, -150),
        _ => (ChainType::Filter, -300),
    };
    Some(BaseChain { ty, hook, priority })
}

/// One family's rules as our tables (tables without rules left out).
pub fn lower(rules: &[Rule], family: Family) -> Result<Vec<NftTable>, RulesError> {
    let decls = declared_chains(rules);
    let mut out = Vec::new();
    for (ipt_table, name) in TABLES {
        let contents = chain_contents(rules, ipt_table);
        if contents.is_empty() {
            continue;
        }
        // Base chains first, then Istio's chains in declaration order.
        let mut order: Vec<String> = ["PREROUTING", "OUTPUT"]
            .iter()
            .filter(|c| contents.iter().any(|(n, _)| n == *c))
            .map(|c| c.to_string())
            .collect();
        order.extend(
            decls
                .iter()
                .filter(|(t, _)| *t == ipt_table)
                .map(|(_, c)| c.clone()),
        );
        let mut chains = Vec::new();
        for c in order {
            let mut lowered = Vec::new();
            for params in contents
                .iter()
                .find(|(n, _)| *n == c)
                .map(|(_, r)| r.as_slice())
                .unwrap_or_default()
            {
                lowered.push(lower_rule(params, family)?);
            }
            chains.push(NftChain {
                name: if base_chain(ipt_table, &c).is_some() {
                    c.to_ascii_lowercase()
                } else {
                    chain_name(&c)
                },
                base: base_chain(ipt_table, &c),
                rules: lowered,
            });
        }
        out.push(NftTable {
            name: name.to_owned(),
            chains,
        });
    }
    Ok(out)
}

/// One transaction making `want` (per family) the exact content of our tables: each
/// wanted table is re-created whole, each unwanted one deleted (`add` first, so deleting
/// an absent table cannot fail).
pub fn apply_batch(want: &[(Family, Vec<NftTable>)]) -> Batch {
    let mut b = Batch::new();
    for (family, tables) in want {
        let fam = nfproto(*family);
        for (_, name) in TABLES {
            b.add_table(fam, name);
            b.delete_table(fam, name);
            let Some(t) = tables.iter().find(|t| t.name == name) else {
                continue;
            };
            b.add_table(fam, name);
            for c in &t.chains {
                b.add_chain(fam, name, &c.name, c.base);
            }
            for c in &t.chains {
                for r in &c.rules {
                    b.add_rule(fam, name, &c.name, r);
                }
            }
        }
    }
    b
}

fn unsupported(what: &str) -> RulesError {
    RulesError::Config(format!(
        "nftables: sidecar rule part {what:?} has no lowering"
    ))
}

use crate::nft::lower::{op, port_cmp};

fn num<T: std::str::FromStr>(v: Option<&str>, what: &str) -> Result<T, RulesError> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| unsupported(what))
}

/// `ip|ip6 saddr|daddr [!=] addr/len`: load the prefix's bytes, mask a partial last byte.
fn addr_cmp(e: &mut Vec<Expr>, addr: IpAddr, len: u32, neg: bool, src: bool) {
    let (bytes, offset) = match addr {
        IpAddr::V4(a) => (a.octets().to_vec(), if src { 12 } else { 16 }),
        IpAddr::V6(a) => (a.octets().to_vec(), if src { 8 } else { 24 }),
    };
    crate::nft::lower::prefix_cmp(e, offset, &bytes, len, neg);
}

fn imm_set(e: &mut Vec<Expr>, data: Vec<u8>, set: Expr) {
    e.push(Expr::Immediate { dreg: R1, data });
    e.push(set);
}

/// Conntrack state bits (`NF_CT_STATE_*_BIT`).
fn ct_state_bits(states: &str) -> Result<u32, RulesError> {
    states.split(',').try_fold(0u32, |acc, s| {
        Ok(acc
            | match s {
                "INVALID" => 1,
                "ESTABLISHED" => 2,
                "RELATED" => 4,
                "NEW" => 8,
                "UNTRACKED" => 64,
                other => return Err(unsupported(other)),
            })
    })
}

/// One rule's parameters (Istio's iptables order) as nf_tables expressions.
pub fn lower_rule(params: &[String], family: Family) -> Result<Vec<Expr>, RulesError> {
    let mut e = Vec::new();
    let mut module = "";
    let mut neg = false;
    let mut it = params.iter().map(String::as_str);
    while let Some(tok) = it.next() {
        if tok == "!" {
            neg = true;
            continue;
        }
        let n = std::mem::take(&mut neg);
        match tok {
            "-s" | "-d" => {
                let v = it.next().unwrap_or("");
                let (a, len) = v.split_once('/').unwrap_or((v, ""));
                let addr: IpAddr = num(Some(a), v)?;
                let len: u32 = len.parse().unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
                addr_cmp(&mut e, addr, len, n, tok == "-s");
            }
            "-i" | "-o" => {
                let key = if tok == "-i" {
                    MetaKey::IifName
                } else {
                    MetaKey::OifName
                };
                meta_cmp(&mut e, key, op(n), ifname(it.next().unwrap_or(""))?);
            }
            "-p" => {
                let proto = match it.next() {
                    Some("tcp") => 6u8,
                    Some("udp") => 17,
                    other => return Err(unsupported(other.unwrap_or("-p"))),
                };
                match family {
                    // nft's own dependency in an `ip` table is `ip protocol`; `nft list`
                    // cannot print transport matches after any other.
                    Family::V4 => {
                        e.push(Expr::Payload {
                            base: PayloadBase::Network,
                            offset: 9,
                            len: 1,
                            dreg: R1,
                        });
                        e.push(Expr::Cmp {
                            sreg: R1,
                            op: op(n),
                            data: vec![proto],
                        });
                    }
                    Family::V6 => meta_cmp(&mut e, MetaKey::L4Proto, op(n), vec![proto]),
                }
            }
            "-m" => module = it.next().unwrap_or(""),
            "--dport" => port_cmp(&mut e, 2, num(it.next(), tok)?, n),
            "--sport" => port_cmp(&mut e, 0, num(it.next(), tok)?, n),
            "--dports" if n => {
                // `! --dports a,b`: none of them, one `!=` each.
                for p in it.next().unwrap_or("").split(',') {
                    port_cmp(&mut e, 2, num(Some(p), "--dports")?, true);
                }
            }
            "--uid-owner" | "--gid-owner" => {
                let key = if tok == "--uid-owner" {
                    MetaKey::SkUid
                } else {
                    MetaKey::Other(NFT_META_SKGID)
                };
                let id: u32 = num(it.next(), tok)?;
                meta_cmp(&mut e, key, op(n), id.to_ne_bytes().to_vec());
            }
            "--ctstate" => {
                let bits = ct_state_bits(it.next().unwrap_or(""))?;
                e.push(Expr::Ct {
                    key: CtKey::Other(NFT_CT_STATE),
                    dreg: R1,
                });
                e.push(Expr::Bitwise {
                    sreg: R1,
                    dreg: R1,
                    mask: bits.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                e.push(Expr::Cmp {
                    sreg: R1,
                    op: if n { CmpOp::Eq } else { CmpOp::Neq },
                    data: vec![0; 4],
                });
            }
            "--mark" => {
                let v: u32 = num(it.next(), tok)?;
                e.push(if module == "connmark" {
                    Expr::Ct {
                        key: CtKey::Mark,
                        dreg: R1,
                    }
                } else {
                    Expr::Meta {
                        key: MetaKey::Mark,
                        dreg: R1,
                    }
                });
                e.push(Expr::Cmp {
                    sreg: R1,
                    op: op(n),
                    data: v.to_ne_bytes().to_vec(),
                });
            }
            "-j" => {
                let target = it.next().unwrap_or("");
                let opts: Vec<&str> = it.by_ref().collect();
                lower_target(&mut e, target, &opts, family)?;
            }
            other => return Err(unsupported(other)),
        }
    }
    Ok(e)
}

fn lower_target(
    e: &mut Vec<Expr>,
    target: &str,
    opts: &[&str],
    family: Family,
) -> Result<(), RulesError> {
    let opt = |name: &str| {
        opts.iter()
            .position(|o| *o == name)
            .and_then(|i| opts.get(i + 1))
            .copied()
    };
    match target {
        "RETURN" => e.push(Expr::Verdict(Verdict::Return)),
        "ACCEPT" => e.push(Expr::Verdict(Verdict::Accept)),
        "DROP" => e.push(Expr::Verdict(Verdict::Drop)),
        "REDIRECT" => {
            let port: u16 = num(opt("--to-ports").or(opt("--to-port")), "--to-ports")?;
            imm_set(
                e,
                port.to_be_bytes().to_vec(),
                Expr::Redir {
                    reg_proto_min: Some(R1),
                    flags: NF_NAT_RANGE_PROTO_SPECIFIED,
                },
            );
        }
        "TPROXY" => {
            // `tproxy to :port meta mark set M accept`, as Istio's nft rules say it.
            let port: u16 = num(opt("--on-port"), "--on-port")?;
            let mark = opt("--tproxy-mark").unwrap_or("");
            let mark: u32 = num(mark.split('/').next(), "--tproxy-mark")?;
            imm_set(
                e,
                port.to_be_bytes().to_vec(),
                Expr::Tproxy {
                    family: nfproto(family),
                    reg_addr: None,
                    reg_port: Some(R1),
                },
            );
            imm_set(
                e,
                mark.to_ne_bytes().to_vec(),
                Expr::MetaSet {
                    key: MetaKey::Mark,
                    sreg: R1,
                },
            );
            e.push(Expr::Verdict(Verdict::Accept));
        }
        "MARK" => {
            let mark: u32 = num(opt("--set-mark"), "--set-mark")?;
            imm_set(
                e,
                mark.to_ne_bytes().to_vec(),
                Expr::MetaSet {
                    key: MetaKey::Mark,
                    sreg: R1,
                },
            );
        }
        "CONNMARK" if opts.first() == Some(&"--save-mark") => {
            e.push(Expr::Meta {
                key: MetaKey::Mark,
                dreg: R1,
            });
            e.push(Expr::CtSet {
                key: CtKey::Mark,
                sreg: R1,
            });
        }
        "CONNMARK" if opts.first() == Some(&"--restore-mark") => {
            e.push(Expr::Ct {
                key: CtKey::Mark,
                dreg: R1,
            });
            e.push(Expr::MetaSet {
                key: MetaKey::Mark,
                sreg: R1,
            });
        }
        "CT" => {
            let zone: u16 = num(opt("--zone"), "--zone")?;
            imm_set(
                e,
                zone.to_ne_bytes().to_vec(),
                Expr::CtSet {
                    key: CtKey::Zone,
                    sreg: R1,
                },
            );
        }
        chain if chain.starts_with("ISTIO_") => {
            e.push(Expr::Verdict(Verdict::Jump(chain_name(chain))));
        }
        other => return Err(unsupported(other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::generate::rules;
    use crate::sidecar::{SidecarConfig, SidecarInputs};

    fn cfg(ann: &[(&str, &str)], env: &[(&str, &str)], ip: &str) -> SidecarConfig {
        SidecarConfig::from_inputs(&SidecarInputs {
            pod: "ns/p".into(),
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proxy_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pod_ips: vec![ip.parse().unwrap()],
            ..SidecarInputs::default()
        })
        .unwrap()
    }

    #[test]
    fn every_rule_kind_lowers_in_both_families() {
        let all = cfg(
            &[
                ("sidecar.istio.io/interceptionMode", "TPROXY"),
                (
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "10.0.0.0/9,fd00::/7",
                ),
                ("traffic.sidecar.istio.io/includeOutboundPorts", "7777"),
                ("traffic.sidecar.istio.io/excludeInterfaces", "eth9"),
                ("istio.io/reroute-virtual-interfaces", "tun0"),
            ],
            &[("ISTIO_META_DNS_CAPTURE", "true"), ("INVALID_DROP", "true")],
            "fd00::2",
        );
        let (v4, v6) = rules(&all);
        for (rules, fam) in [(&v4, Family::V4), (&v6, Family::V6)] {
            let tables = lower(rules, fam).unwrap();
            let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(
                names,
                ["istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"]
            );
            let n: usize = tables
                .iter()
                .flat_map(|t| &t.chains)
                .map(|c| c.rules.len())
                .sum();
            assert_eq!(n, rules.len(), "{fam:?}: one nft rule per iptables rule");
        }
    }

    #[test]
    fn tproxy_rule_is_tproxy_then_mark_then_accept() {
        let p: Vec<String> =
            "! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006"
                .split(' ')
                .map(str::to_owned)
                .collect();
        let e = lower_rule(&p, Family::V4).unwrap();
        let tail: Vec<&str> = e.iter().rev().take(5).map(Expr::name).collect();
        assert_eq!(
            tail,
            ["immediate", "meta", "immediate", "tproxy", "immediate"]
        );
        assert_eq!(e.last(), Some(&Expr::Verdict(Verdict::Accept)));
    }

    #[test]
    fn unknown_parts_are_errors_not_panics() {
        for p in ["-m foo --bar 1 -j RETURN", "-p sctp -j RETURN", "-j NOPE"] {
            let p: Vec<String> = p.split(' ').map(str::to_owned).collect();
            assert!(lower_rule(&p, Family::V4).is_err(), "{p:?}");
        }
    }
}
