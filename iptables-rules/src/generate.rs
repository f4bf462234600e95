//! Pure generation of the in-pod and host-probe rulesets (reference §4.2, §4.6, §2.6).

use std::net::IpAddr;

use crate::config::{HostProbeConfig, InpodConfig};
use crate::constants::*;
use crate::model::{
    loopback, probe_set, Chain, Family, Match, Net, Rule, Ruleset, Table, Target, L4,
};

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

fn not_inpod_mark() -> Match {
    Match::Mark {
        value: INPOD_MARK,
        mask: INPOD_MASK,
        neg: true,
    }
}

fn inpod_mark() -> Match {
    Match::Mark {
        value: INPOD_MARK,
        mask: INPOD_MASK,
        neg: false,
    }
}

fn not_loopback(f: Family) -> Match {
    Match::Daddr {
        net: loopback(f),
        neg: true,
    }
}

/// The in-pod ruleset for `cfg`, in the reference's order.
pub fn inpod_ruleset(cfg: &InpodConfig) -> Ruleset {
    let fams = families(cfg.ipv6);
    let snat = |f: Family| -> IpAddr {
        match f {
            Family::V4 => IpAddr::V4(cfg.probe_snat_v4),
            Family::V6 => IpAddr::V6(cfg.probe_snat_v6),
        }
    };
    let mut rules = Vec::new();
    let r = Rule::new;

    // mangle: tag ztunnel-marked connections, restore the mark on their replies.
    rules.push(r(
        None,
        Table::Mangle,
        Chain::Prerouting,
        vec![],
        Target::Jump(Chain::IstioPrert),
    ));
    rules.push(r(
        None,
        Table::Mangle,
        Chain::Output,
        vec![],
        Target::Jump(Chain::IstioOutput),
    ));
    rules.push(r(
        None,
        Table::Mangle,
        Chain::IstioPrert,
        vec![inpod_mark()],
        Target::ConnmarkSetXmark {
            value: INPOD_TPROXY_MARK,
            mask: INPOD_TPROXY_MASK,
        },
    ));
    rules.push(r(
        None,
        Table::Mangle,
        Chain::IstioOutput,
        vec![Match::ConnMark {
            value: INPOD_TPROXY_MARK,
            mask: INPOD_TPROXY_MASK,
        }],
        Target::ConnmarkRestore {
            nfmask: INPOD_RESTORE_MASK,
            ctmask: INPOD_RESTORE_MASK,
        },
    ));

    // nat
    rules.push(r(
        None,
        Table::Nat,
        Chain::Output,
        vec![],
        Target::Jump(Chain::IstioOutput),
    ));
    rules.push(r(
        None,
        Table::Nat,
        Chain::Prerouting,
        vec![],
        Target::Jump(Chain::IstioPrert),
    ));
    for vif in &cfg.virtual_interfaces {
        let m = vec![Match::Iif(vif.clone()), Match::Proto(L4::Tcp)];
        rules.push(r(
            None,
            Table::Nat,
            Chain::IstioPrert,
            m.clone(),
            Target::Redirect(PORT_OUTBOUND),
        ));
        rules.push(r(None, Table::Nat, Chain::IstioPrert, m, Target::Return));
    }
    if !cfg.bypass_inbound {
        for &f in &fams {
            let m = vec![
                Match::Saddr {
                    net: Net::host(snat(f)),
                    neg: false,
                },
                Match::Proto(L4::Tcp),
                Match::ProtoModule(L4::Tcp),
            ];
            rules.push(
                r(Some(f), Table::Nat, Chain::IstioPrert, m, Target::Accept)
                    .with_nft_order(&[1, 0, 2]),
            );
        }
    }
    for &f in &fams {
        let m = vec![
            Match::Daddr {
                net: Net::host(snat(f)),
                neg: false,
            },
            Match::Proto(L4::Tcp),
            Match::ProtoModule(L4::Tcp),
        ];
        rules.push(
            r(Some(f), Table::Nat, Chain::IstioOutput, m, Target::Accept)
                .with_nft_order(&[1, 0, 2]),
        );
    }
    if !cfg.bypass_inbound {
        for &f in &fams {
            let m = vec![
                not_loopback(f),
                Match::Proto(L4::Tcp),
                Match::Dport {
                    port: PORT_INBOUND_HBONE,
                    neg: true,
                },
                not_inpod_mark(),
            ];
            rules.push(r(
                Some(f),
                Table::Nat,
                Chain::IstioPrert,
                m,
                Target::Redirect(PORT_INBOUND_PLAINTEXT),
            ));
        }
    }
    if cfg.dns_capture {
        let m = vec![
            Match::Oif {
                name: "lo".into(),
                neg: true,
            },
            Match::Proto(L4::Udp),
            not_inpod_mark(),
            Match::Dport {
                port: PORT_DNS,
                neg: false,
            },
        ];
        rules.push(
            r(
                None,
                Table::Nat,
                Chain::IstioOutput,
                m,
                Target::Redirect(PORT_DNS_PROXY),
            )
            .with_nft_order(&[0, 2, 1, 3]),
        );
        for &f in &fams {
            let m = vec![
                not_loopback(f),
                Match::Proto(L4::Tcp),
                Match::Dport {
                    port: PORT_DNS,
                    neg: false,
                },
                not_inpod_mark(),
            ];
            rules.push(r(
                Some(f),
                Table::Nat,
                Chain::IstioOutput,
                m,
                Target::Redirect(PORT_DNS_PROXY),
            ));
        }
    }
    rules.push(r(
        None,
        Table::Nat,
        Chain::IstioOutput,
        vec![
            Match::Proto(L4::Tcp),
            Match::Mark {
                value: INPOD_TPROXY_MARK,
                mask: INPOD_TPROXY_MASK,
                neg: false,
            },
        ],
        Target::Accept,
    ));
    for &f in &fams {
        let m = vec![
            not_loopback(f),
            Match::Oif {
                name: "lo".into(),
                neg: false,
            },
        ];
        rules.push(
            r(Some(f), Table::Nat, Chain::IstioOutput, m, Target::Accept).with_nft_order(&[1, 0]),
        );
    }
    for &f in &fams {
        let m = vec![not_loopback(f), Match::Proto(L4::Tcp), not_inpod_mark()];
        rules.push(
            r(
                Some(f),
                Table::Nat,
                Chain::IstioOutput,
                m,
                Target::Redirect(PORT_OUTBOUND),
            )
            .with_nft_order(&[1, 0, 2]),
        );
    }

    // raw: ztunnel's upstream DNS and its replies in their own conntrack zone.
    if cfg.dns_capture {
        rules.push(r(
            None,
            Table::Raw,
            Chain::Prerouting,
            vec![],
            Target::Jump(Chain::IstioPrert),
        ));
        rules.push(r(
            None,
            Table::Raw,
            Chain::Output,
            vec![],
            Target::Jump(Chain::IstioOutput),
        ));
        rules.push(
            r(
                None,
                Table::Raw,
                Chain::IstioOutput,
                vec![
                    Match::Proto(L4::Udp),
                    inpod_mark(),
                    Match::Dport {
                        port: PORT_DNS,
                        neg: false,
                    },
                ],
                Target::CtZone(DNS_CT_ZONE),
            )
            .with_nft_order(&[0, 2, 1]),
        );
        rules.push(
            r(
                None,
                Table::Raw,
                Chain::IstioPrert,
                vec![
                    Match::Proto(L4::Udp),
                    not_inpod_mark(),
                    Match::Sport { port: PORT_DNS },
                ],
                Target::CtZone(DNS_CT_ZONE),
            )
            .with_nft_order(&[0, 2, 1]),
        );
    }

    Ruleset {
        families: fams,
        rules,
    }
}

/// The host-netns probe SNAT ruleset; the form follows `cfg.kubelet_uid` (see
/// [`HostProbeConfig::kubelet_uid`]).
pub fn host_probe_ruleset(cfg: &HostProbeConfig) -> Ruleset {
    let fams = families(cfg.ipv6);
    let mut rules = Vec::new();
    let snat = |f: Family| -> IpAddr {
        match f {
            Family::V4 => IpAddr::V4(cfg.probe_snat_v4),
            Family::V6 => IpAddr::V6(cfg.probe_snat_v6),
        }
    };
    match cfg.kubelet_uid {
        None => {
            rules.push(
                Rule::new(
                    None,
                    Table::Nat,
                    Chain::Postrouting,
                    vec![],
                    Target::Jump(Chain::IstioPostrt),
                )
                .inserted_first(),
            );
            for &f in &fams {
                let m = vec![
                    Match::SocketExists,
                    Match::Proto(L4::Tcp),
                    Match::SetDaddr(probe_set(f).into()),
                ];
                rules.push(Rule::new(
                    Some(f),
                    Table::Nat,
                    Chain::IstioPostrt,
                    m,
                    Target::Snat(snat(f)),
                ));
            }
        }
        Some(uid) => {
            for &f in &fams {
                let m = vec![
                    Match::Proto(L4::Tcp),
                    Match::SkUid(uid),
                    Match::SetDaddr(probe_set(f).into()),
                ];
                rules.push(Rule::new(
                    Some(f),
                    Table::Nat,
                    Chain::Postrouting,
                    m,
                    Target::Snat(snat(f)),
                ));
            }
        }
    }
    Ruleset {
        families: fams,
        rules,
    }
}
