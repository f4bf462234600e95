//! Pure rule generation: the rules `istio-iptables` builds for a sidecar pod, in its
//! order, per family (`tools/istio-iptables/pkg/capture/run.go`), and the
//! `iptables-restore` payload Istio's rule builder prints from them.

use super::{Inbound, Mode, OutboundRanges, Prefix, SidecarConfig};
use crate::model::Family;

/// Envoy's outbound listener.
pub const PROXY_PORT: u16 = 15001;
/// Envoy's inbound listener.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The HBONE tunnel port, never captured inbound.
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
/// The istio-agent DNS listener.
pub const DNS_PORT: u16 = 15053;
/// Mark TPROXY puts on captured inbound packets (and the policy rule's fwmark).
pub const TPROXY_MARK: u32 = 1337;
/// Mark on the proxy's own loopback traffic in TPROXY mode.
pub const OUTBOUND_MARK: u32 = 1338;
/// Routing table of the TPROXY local route.
pub const TPROXY_ROUTE_TABLE: u32 = 133;

/// `ISTIO_INBOUND`.
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// `ISTIO_REDIRECT`: outbound capture to 15001.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// `ISTIO_IN_REDIRECT`: inbound capture to 15006.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// `ISTIO_OUTPUT`.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
/// `ISTIO_OUTPUT_DNS`.
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
/// `ISTIO_DIVERT` (TPROXY).
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
/// `ISTIO_TPROXY` (TPROXY).
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
/// `ISTIO_DROP` (INVALID_DROP).
pub const ISTIO_DROP: &str = "ISTIO_DROP";

/// Chains (and targets) Istio's builder never declares.
const BUILTIN: [&str; 8] = [
    "INPUT",
    "OUTPUT",
    "FORWARD",
    "PREROUTING",
    "POSTROUTING",
    "ACCEPT",
    "RETURN",
    "DROP",
];

/// True for the kernel's built-in chains (and the builtin verdicts).
pub fn is_builtin(chain: &str) -> bool {
    BUILTIN.contains(&chain)
}

/// How a rule is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `-A chain`.
    Append,
    /// `-I chain pos` (1-based).
    Insert(usize),
}

/// One rule as Istio's builder holds it: table, chain, and its parameters in Istio's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `mangle`, `nat` or `raw`.
    pub table: &'static str,
    /// The chain.
    pub chain: &'static str,
    /// Append or insert.
    pub op: Op,
    /// Everything after `-A chain` / `-I chain pos`.
    pub params: Vec<String>,
}

impl Rule {
    /// The restore line (`-A chain params...` / `-I chain pos params...`).
    pub fn line(&self) -> String {
        let head = match self.op {
            Op::Append => format!("-A {}", self.chain),
            Op::Insert(pos) => format!("-I {} {pos}", self.chain),
        };
        std::iter::once(head)
            .chain(self.params.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The jump target, when the rule ends in `-j TARGET`.
    pub fn jump_target(&self) -> Option<&str> {
        let n = self.params.len();
        (n >= 2 && self.params[n - 2] == "-j").then(|| self.params[n - 1].as_str())
    }
}

/// Collects rules per family as Istio's `IptablesRuleBuilder` does.
struct Builder {
    ipv6: bool,
    v4: Vec<Rule>,
    v6: Vec<Rule>,
}

/// Placeholder for the family-specific address in a versioned rule.
const IP: &str = "{ip}";

impl Builder {
    fn push(&mut self, fam: Family, table: &'static str, chain: &'static str, op: Op, p: &[&str]) {
        let list = match fam {
            Family::V4 => &mut self.v4,
            Family::V6 if self.ipv6 => &mut self.v6,
            Family::V6 => return,
        };
        list.push(Rule {
            table,
            chain,
            op,
            params: p.iter().map(|s| s.to_string()).collect(),
        });
    }

    fn append(&mut self, table: &'static str, chain: &'static str, p: &[&str]) {
        self.push(Family::V4, table, chain, Op::Append, p);
        self.push(Family::V6, table, chain, Op::Append, p);
    }

    fn insert(&mut self, table: &'static str, chain: &'static str, pos: usize, p: &[&str]) {
        self.push(Family::V4, table, chain, Op::Insert(pos), p);
        self.push(Family::V6, table, chain, Op::Insert(pos), p);
    }

    /// A rule whose [`IP`] placeholder is `v4` in IPv4 and `v6` in IPv6.
    fn versioned(
        &mut self,
        v4: &str,
        v6: &str,
        table: &'static str,
        chain: &'static str,
        p: &[&str],
    ) {
        for (fam, ip) in [(Family::V4, v4), (Family::V6, v6)] {
            let p: Vec<&str> = p.iter().map(|s| if *s == IP { ip } else { s }).collect();
            self.push(fam, table, chain, Op::Append, &p);
        }
    }
}

/// Istio's host loopback CIDR (`HOST_IPV4_LOOPBACK_CIDR` default) and its IPv6 twin.
const LOOPBACK_V4: &str = "127.0.0.1/32";
const LOOPBACK_V6: &str = "::1/128";
/// The inbound passthrough source (`127.0.0.6`, `::6`).
const INBOUND_SRC_V4: &str = "127.0.0.6/32";
const INBOUND_SRC_V6: &str = "::6/128";

/// The rules of `cfg`, per family (IPv6 empty unless `cfg.ipv6()`), in Istio's order.
pub fn rules(cfg: &SidecarConfig) -> (Vec<Rule>, Vec<Rule>) {
    let mut b = Builder {
        ipv6: cfg.ipv6,
        v4: Vec::new(),
        v6: Vec::new(),
    };
    let tproxy = cfg.mode == Mode::Tproxy;
    let uid = cfg.proxy_uid.to_string();
    let gid = cfg.proxy_gid.to_string();
    let tunnel = INBOUND_TUNNEL_PORT.to_string();
    let tproxy_mark = TPROXY_MARK.to_string();
    let outbound_mark = OUTBOUND_MARK.to_string();

    // Excluded interfaces go direct; virtual interfaces return early (inserted first).
    for ifc in &cfg.exclude_interfaces {
        b.append("nat", "PREROUTING", &["-i", ifc, "-j", "RETURN"]);
        b.append("nat", "OUTPUT", &["-o", ifc, "-j", "RETURN"]);
    }
    if tproxy {
        for ifc in &cfg.exclude_interfaces {
            b.append("mangle", "PREROUTING", &["-i", ifc, "-j", "RETURN"]);
            b.append("mangle", "OUTPUT", &["-o", ifc, "-j", "RETURN"]);
        }
    }
    for ifc in &cfg.reroute_virtual_interfaces {
        b.insert("nat", "PREROUTING", 1, &["-i", ifc, "-j", "RETURN"]);
    }
    if cfg.invalid_drop {
        b.append(
            "mangle",
            "PREROUTING",
            &["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        );
        b.append("mangle", ISTIO_DROP, &["-j", "DROP"]);
    }
    b.append(
        "nat",
        ISTIO_INBOUND,
        &["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"],
    );
    let proxy_port = PROXY_PORT.to_string();
    let inbound_port = INBOUND_CAPTURE_PORT.to_string();
    b.append(
        "nat",
        ISTIO_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &proxy_port],
    );
    b.append(
        "nat",
        ISTIO_IN_REDIRECT,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound_port],
    );
    inbound(&mut b, cfg, tproxy);

    b.append("nat", "OUTPUT", &["-j", ISTIO_OUTPUT]);
    for port in &cfg.exclude_outbound_ports {
        let port = port.to_string();
        for proto in ["tcp", "udp"] {
            b.append(
                "nat",
                ISTIO_OUTPUT,
                &["-p", proto, "--dport", &port, "-j", "RETURN"],
            );
        }
    }
    b.versioned(
        INBOUND_SRC_V4,
        INBOUND_SRC_V6,
        "nat",
        ISTIO_OUTPUT,
        &["-o", "lo", "-s", IP, "-j", "RETURN"],
    );
    let include_has_loopback = match &cfg.include_outbound {
        OutboundRanges::All => false,
        OutboundRanges::Cidrs(c) => c.iter().any(|p| p.addr.is_loopback()),
    };
    let dns = cfg.dns_capture;
    let dports = format!("53,{tunnel}");
    // The proxy's own traffic: to itself over lo goes inbound, anything else direct.
    for (owner, id) in [("--uid-owner", &uid), ("--gid-owner", &gid)] {
        // With DNS capture the proxy's DNS to itself stays on lo as well (Istio's multiport form).
        let not_tunnel: &[&str] = if dns && owner == "--uid-owner" {
            &["-m", "multiport", "!", "--dports", &dports]
        } else {
            &["!", "--dport", &tunnel]
        };
        let args: Vec<&str> = ["-o", "lo", "!", "-d", IP, "-p", "tcp"]
            .iter()
            .chain(not_tunnel)
            .chain(&["-m", "owner", owner, id, "-j", ISTIO_IN_REDIRECT])
            .copied()
            .collect();
        b.versioned(LOOPBACK_V4, LOOPBACK_V6, "nat", ISTIO_OUTPUT, &args);
        if !include_has_loopback {
            if dns {
                b.append(
                    "nat",
                    ISTIO_OUTPUT,
                    &[
                        "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", owner,
                        id, "-j", "RETURN",
                    ],
                );
            } else {
                b.append(
                    "nat",
                    ISTIO_OUTPUT,
                    &["-o", "lo", "-m", "owner", "!", owner, id, "-j", "RETURN"],
                );
            }
        }
        b.append(
            "nat",
            ISTIO_OUTPUT,
            &["-m", "owner", owner, id, "-j", "RETURN"],
        );
    }
    if dns {
        dns_capture(&mut b, &uid, &gid);
    }
    b.versioned(
        LOOPBACK_V4,
        LOOPBACK_V6,
        "nat",
        ISTIO_OUTPUT,
        &["-d", IP, "-j", "RETURN"],
    );
    for p in &cfg.exclude_outbound_cidrs {
        let cidr = p.to_string();
        b.push(
            p.family(),
            "nat",
            ISTIO_OUTPUT,
            Op::Append,
            &["-d", &cidr, "-j", "RETURN"],
        );
    }
    for port in &cfg.include_outbound_ports {
        let port = port.to_string();
        b.append(
            "nat",
            ISTIO_OUTPUT,
            &["-p", "tcp", "--dport", &port, "-j", ISTIO_REDIRECT],
        );
    }
    for fam in [Family::V4, Family::V6] {
        outbound_include(&mut b, cfg, fam);
    }
    if tproxy {
        b.append(
            "mangle",
            "PREROUTING",
            &[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &tproxy_mark,
                "-j",
                "CONNMARK",
                "--save-mark",
            ],
        );
        b.append(
            "mangle",
            "OUTPUT",
            &[
                "-p",
                "tcp",
                "-o",
                "lo",
                "-m",
                "mark",
                "--mark",
                &tproxy_mark,
                "-j",
                "RETURN",
            ],
        );
        for (owner, id) in [("--uid-owner", &uid), ("--gid-owner", &gid)] {
            b.versioned(
                LOOPBACK_V4,
                LOOPBACK_V6,
                "mangle",
                "OUTPUT",
                &[
                    "!",
                    "-d",
                    IP,
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    owner,
                    id,
                    "-j",
                    "MARK",
                    "--set-mark",
                    &outbound_mark,
                ],
            );
        }
        b.append(
            "mangle",
            "OUTPUT",
            &[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                &tproxy_mark,
                "-j",
                "CONNMARK",
                "--restore-mark",
            ],
        );
        b.insert(
            "mangle",
            ISTIO_INBOUND,
            1,
            &[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &tproxy_mark,
                "-j",
                "RETURN",
            ],
        );
        for (fam, src) in [(Family::V4, INBOUND_SRC_V4), (Family::V6, INBOUND_SRC_V6)] {
            b.push(
                fam,
                "mangle",
                ISTIO_INBOUND,
                Op::Insert(2),
                &["-p", "tcp", "-s", src, "-i", "lo", "-j", "RETURN"],
            );
        }
        b.insert(
            "mangle",
            ISTIO_INBOUND,
            3,
            &[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                &outbound_mark,
                "-j",
                "RETURN",
            ],
        );
    }
    (b.v4, b.v6)
}

/// Inbound capture (`handleInboundPortsInclude`).
fn inbound(b: &mut Builder, cfg: &SidecarConfig, tproxy: bool) {
    if cfg.include_inbound == Inbound::None {
        return;
    }
    let mark = TPROXY_MARK.to_string();
    let table = if tproxy {
        let tmark = format!("{mark}/0xffffffff");
        let port = INBOUND_CAPTURE_PORT.to_string();
        b.append("mangle", ISTIO_DIVERT, &["-j", "MARK", "--set-mark", &mark]);
        b.append("mangle", ISTIO_DIVERT, &["-j", "ACCEPT"]);
        b.versioned(
            LOOPBACK_V4,
            LOOPBACK_V6,
            "mangle",
            ISTIO_TPROXY,
            &[
                "!",
                "-d",
                IP,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                &tmark,
                "--on-port",
                &port,
            ],
        );
        "mangle"
    } else {
        "nat"
    };
    b.append(table, "PREROUTING", &["-p", "tcp", "-j", ISTIO_INBOUND]);
    match &cfg.include_inbound {
        Inbound::All => {
            for port in &cfg.exclude_inbound_ports {
                let port = port.to_string();
                b.append(
                    table,
                    ISTIO_INBOUND,
                    &["-p", "tcp", "--dport", &port, "-j", "RETURN"],
                );
            }
            if tproxy {
                b.append(
                    "mangle",
                    ISTIO_INBOUND,
                    &[
                        "-p",
                        "tcp",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "RELATED,ESTABLISHED",
                        "-j",
                        ISTIO_DIVERT,
                    ],
                );
                b.append("mangle", ISTIO_INBOUND, &["-p", "tcp", "-j", ISTIO_TPROXY]);
            } else {
                b.append(
                    "nat",
                    ISTIO_INBOUND,
                    &["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
                );
            }
        }
        Inbound::Ports(ports) => {
            for port in ports {
                let port = port.to_string();
                if tproxy {
                    b.append(
                        "mangle",
                        ISTIO_INBOUND,
                        &[
                            "-p",
                            "tcp",
                            "--dport",
                            &port,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "RELATED,ESTABLISHED",
                            "-j",
                            ISTIO_DIVERT,
                        ],
                    );
                    b.append(
                        "mangle",
                        ISTIO_INBOUND,
                        &["-p", "tcp", "--dport", &port, "-j", ISTIO_TPROXY],
                    );
                } else {
                    b.append(
                        "nat",
                        ISTIO_INBOUND,
                        &["-p", "tcp", "--dport", &port, "-j", ISTIO_IN_REDIRECT],
                    );
                }
            }
        }
        Inbound::None => {}
    }
}

/// DNS capture to the agent's listener, all DNS (`SetupDNSRedir` with capture-all).
fn dns_capture(b: &mut Builder, uid: &str, gid: &str) {
    let port = DNS_PORT.to_string();
    b.append("raw", "OUTPUT", &["-j", ISTIO_OUTPUT_DNS]);
    b.append("nat", ISTIO_OUTPUT, &["-j", ISTIO_OUTPUT_DNS]);
    b.append(
        "nat",
        ISTIO_OUTPUT_DNS,
        &[
            "-p",
            "tcp",
            "--dport",
            "53",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ],
    );
    b.append(
        "nat",
        ISTIO_OUTPUT_DNS,
        &[
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "REDIRECT",
            "--to-port",
            &port,
        ],
    );
    // Conntrack zones keep the proxy's upstream DNS apart from the app's captured DNS.
    for (owner, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        b.append(
            "raw",
            ISTIO_OUTPUT_DNS,
            &[
                "-p", "udp", "--dport", "53", "-m", "owner", owner, id, "-j", "CT", "--zone", "1",
            ],
        );
        b.append(
            "raw",
            ISTIO_OUTPUT_DNS,
            &[
                "-p", "udp", "--sport", &port, "-m", "owner", owner, id, "-j", "CT", "--zone", "2",
            ],
        );
    }
    b.append("raw", "PREROUTING", &["-j", ISTIO_INBOUND]);
    b.append(
        "raw",
        ISTIO_OUTPUT_DNS,
        &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
    );
    b.append(
        "raw",
        ISTIO_INBOUND,
        &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
    );
}

/// Outbound capture by destination (`handleOutboundIncludeRules`), one family.
fn outbound_include(b: &mut Builder, cfg: &SidecarConfig, fam: Family) {
    match &cfg.include_outbound {
        OutboundRanges::All => {
            b.push(
                fam,
                "nat",
                ISTIO_OUTPUT,
                Op::Append,
                &["-j", ISTIO_REDIRECT],
            );
            for ifc in &cfg.reroute_virtual_interfaces {
                b.push(
                    fam,
                    "nat",
                    "PREROUTING",
                    Op::Insert(1),
                    &["-i", ifc, "-j", ISTIO_REDIRECT],
                );
            }
        }
        OutboundRanges::Cidrs(cidrs) => {
            for p in cidrs.iter().filter(|p| p.family() == fam) {
                let cidr = p.to_string();
                for ifc in &cfg.reroute_virtual_interfaces {
                    b.push(
                        fam,
                        "nat",
                        "PREROUTING",
                        Op::Insert(1),
                        &["-i", ifc, "-d", &cidr, "-j", ISTIO_REDIRECT],
                    );
                }
                b.push(
                    fam,
                    "nat",
                    ISTIO_OUTPUT,
                    Op::Append,
                    &["-d", &cidr, "-j", ISTIO_REDIRECT],
                );
            }
        }
    }
}

/// Chains Istio declares per table: each rule's chain, then each jump target, in first
/// appearance order, built-ins left out (`buildRestore`).
pub fn declared_chains(rules: &[Rule]) -> Vec<(&'static str, String)> {
    let mut seen: Vec<(&'static str, String)> = Vec::new();
    let mut add = |table: &'static str, chain: &str| {
        if !seen.iter().any(|(t, c)| *t == table && c == chain) {
            seen.push((table, chain.to_owned()));
        }
    };
    for r in rules {
        add(r.table, r.chain);
    }
    for r in rules {
        if let Some(t) = r.jump_target() {
            add(r.table, t);
        }
    }
    seen.into_iter().filter(|(_, c)| !is_builtin(c)).collect()
}

/// The tables Istio's restore payload has, in its (sorted) order.
pub const TABLES: [&str; 3] = ["mangle", "nat", "raw"];

/// Istio's `iptables-restore` payload for one family's rules (`-N`, `-A`, `-I`; tables
/// sorted), byte for byte as its CNI plugin would program it.
pub fn restore_text(rules: &[Rule]) -> String {
    let decls = declared_chains(rules);
    let mut out = String::new();
    for table in TABLES {
        let mut lines: Vec<String> = decls
            .iter()
            .filter(|(t, _)| *t == table)
            .map(|(_, c)| format!("-N {c}"))
            .collect();
        lines.extend(rules.iter().filter(|r| r.table == table).map(Rule::line));
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("* {table}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

impl Prefix {
    /// The address family.
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Helper for tests and docs: the restore payload of `cfg` for `family`.
pub fn restore_for(cfg: &SidecarConfig, family: Family) -> String {
    let (v4, v6) = rules(cfg);
    match family {
        Family::V4 => restore_text(&v4),
        Family::V6 => restore_text(&v6),
    }
}
