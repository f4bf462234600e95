//! The redirection ruleset as backend-neutral data.
//!
//! One [`Ruleset`] describes both families: rules with `family: None` apply to every
//! family of the ruleset (iptables: emitted in each family's restore text; nftables
//! `inet` tables: one rule without a family match); address-bearing rules carry
//! `Some(family)`. The rule order is the reference's order; for dual-stack the IPv6
//! twin of a rule directly follows its IPv4 rule (Istio's nft order), which filtered
//! per family is exactly Istio's iptables order.
//!
//! `matches` are in Istio's iptables text order. Istio's nft rules were written by
//! hand in a few different match orders, which `nft list ruleset` shows; such rules
//! carry `nft_order` so the nftables side can reproduce them exactly.

use std::fmt;
use std::net::IpAddr;

use crate::constants::{self, chain as ipt_chain, nft as nft_names};

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`iptables`, nft `ip`).
    V4,
    /// IPv6 (`ip6tables`, nft `ip6`).
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Netfilter table (iptables names; nft tables are `istio-ambient-<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `mangle` / `istio-ambient-mangle`.
    Mangle,
    /// `nat` / `istio-ambient-nat`.
    Nat,
    /// `raw` / `istio-ambient-raw`.
    Raw,
}

impl Table {
    /// All tables in iptables-restore order (sorted by name).
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];
    /// All tables in Istio's nft transaction order.
    pub const NFT_ORDER: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

    /// iptables table name.
    pub fn iptables_name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }

    /// nftables (`inet`) table name.
    pub fn nft_name(self) -> &'static str {
        match self {
            Table::Mangle => nft_names::TABLE_MANGLE,
            Table::Nat => nft_names::TABLE_NAT,
            Table::Raw => nft_names::TABLE_RAW,
        }
    }
}

/// A chain: the built-in hook chains (nft base chains) and Istio's own chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chain {
    /// Built-in `PREROUTING` / nft base chain `prerouting`.
    Prerouting,
    /// Built-in `OUTPUT` / nft base chain `output`.
    Output,
    /// Built-in `POSTROUTING` / nft base chain `postrouting`.
    Postrouting,
    /// `ISTIO_PRERT` / `istio-prerouting`.
    IstioPrert,
    /// `ISTIO_OUTPUT` / `istio-output`.
    IstioOutput,
    /// `ISTIO_POSTRT` (host, iptables only).
    IstioPostrt,
}

impl Chain {
    /// iptables chain name.
    pub fn iptables_name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
            Chain::Postrouting => "POSTROUTING",
            Chain::IstioPrert => ipt_chain::ISTIO_PRERT,
            Chain::IstioOutput => ipt_chain::ISTIO_OUTPUT,
            Chain::IstioPostrt => ipt_chain::ISTIO_POSTRT,
        }
    }

    /// nftables chain name.
    pub fn nft_name(self) -> &'static str {
        match self {
            Chain::Prerouting => "prerouting",
            Chain::Output => "output",
            Chain::Postrouting => "postrouting",
            Chain::IstioPrert => nft_names::CHAIN_ISTIO_PREROUTING,
            Chain::IstioOutput => nft_names::CHAIN_ISTIO_OUTPUT,
            Chain::IstioPostrt => "istio-postrouting",
        }
    }

    /// True for kernel hook chains (iptables built-ins / nft base chains).
    pub fn is_builtin(self) -> bool {
        matches!(self, Chain::Prerouting | Chain::Output | Chain::Postrouting)
    }
}

/// nft base chain type (`type <t> hook ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NftChainType {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
    /// `route` (re-routes when the mark changes in output).
    Route,
}

impl NftChainType {
    /// The nft keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            NftChainType::Filter => "filter",
            NftChainType::Nat => "nat",
            NftChainType::Route => "route",
        }
    }
}

/// nft base chain definition (reference §4.6 table, §2.6 host chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftBaseChain {
    /// Chain type.
    pub kind: NftChainType,
    /// Hook name (`prerouting`, `output`, `postrouting`); equals the chain name.
    pub hook: &'static str,
    /// Priority.
    pub priority: i32,
}

/// The nft base chain spec of a built-in chain in a table (None for regular chains).
pub fn nft_base_chain(table: Table, chain: Chain) -> Option<NftBaseChain> {
    if !chain.is_builtin() {
        return None;
    }
    let hook = chain.nft_name();
    let (kind, priority) = match (table, chain) {
        (Table::Nat, Chain::Postrouting) => (NftChainType::Nat, 100),
        (Table::Nat, _) => (NftChainType::Nat, -100),
        (Table::Mangle, Chain::Output) => (NftChainType::Route, -150),
        (Table::Mangle, _) => (NftChainType::Filter, -150),
        (Table::Raw, _) => (NftChainType::Filter, -300),
    };
    Some(NftBaseChain {
        kind,
        hook,
        priority,
    })
}

/// Layer-4 protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
}

impl L4 {
    /// Protocol name as iptables/nft spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4::Tcp => 6,
            L4::Udp => 17,
        }
    }
}

/// An address or network. `prefix: None` is a host address written bare (Istio writes
/// the SNAT IP bare and loopback as `/32`; the kernel sees the same thing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Net {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length as written, if any.
    pub prefix: Option<u8>,
}

impl Net {
    /// A bare host address.
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: None }
    }

    /// A host address written with its full prefix (`/32`, `/128`).
    pub fn host_prefixed(addr: IpAddr) -> Self {
        let len = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        Self {
            addr,
            prefix: Some(len),
        }
    }

    /// The effective prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix.unwrap_or(match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        })
    }

    /// The address family.
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            Some(p) => write!(f, "{}/{}", self.addr, p),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// One match condition (all of a rule's matches must hold).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// L4 protocol (`-p tcp` / `meta l4proto tcp`).
    Proto(L4),
    /// iptables `-m tcp`/`-m udp` with no options, as Istio's probe rules carry
    /// (matches non-fragments of that protocol). nft has no counterpart: encode nothing.
    ProtoModule(L4),
    /// Source address.
    Saddr {
        /// Address or network.
        net: Net,
        /// Negated (`!`).
        neg: bool,
    },
    /// Destination address.
    Daddr {
        /// Address or network.
        net: Net,
        /// Negated (`!`).
        neg: bool,
    },
    /// Destination port of the rule's [`Match::Proto`] protocol.
    Dport {
        /// Port.
        port: u16,
        /// Negated.
        neg: bool,
    },
    /// Source port of the rule's [`Match::Proto`] protocol.
    Sport {
        /// Port.
        port: u16,
    },
    /// Input interface name (`-i` / `iifname`).
    Iif(String),
    /// Output interface name (`-o` / `oifname`).
    Oif {
        /// Interface name.
        name: String,
        /// Negated.
        neg: bool,
    },
    /// Packet mark under mask (`-m mark --mark v/m` / `meta mark & m == v`).
    Mark {
        /// Value.
        value: u32,
        /// Mask.
        mask: u32,
        /// Negated.
        neg: bool,
    },
    /// Conntrack mark under mask (`-m connmark --mark v/m` / `ct mark & m == v`).
    ConnMark {
        /// Value.
        value: u32,
        /// Mask.
        mask: u32,
    },
    /// Destination in a named set (`-m set --match-set S dst` / `ip daddr @S`).
    SetDaddr(String),
    /// Packet comes from a local socket (`-m owner --socket-exists`; iptables only).
    SocketExists,
    /// Socket owner UID (`-m owner --uid-owner` / `meta skuid`).
    SkUid(u32),
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Jump to a chain.
    Jump(Chain),
    /// Accept.
    Accept,
    /// Return to the calling chain.
    Return,
    /// Redirect to a local port (`REDIRECT --to-ports` / `redirect to :p`).
    Redirect(u16),
    /// `CONNMARK --set-xmark value/mask` (`ct mark set ct mark & ~mask | value`).
    ConnmarkSetXmark {
        /// Value.
        value: u32,
        /// Mask.
        mask: u32,
    },
    /// `CONNMARK --restore-mark` (`meta mark set ct mark` for full masks).
    ConnmarkRestore {
        /// Packet mark mask.
        nfmask: u32,
        /// Conntrack mark mask.
        ctmask: u32,
    },
    /// Put the connection in a conntrack zone (`CT --zone` / `ct zone set`).
    CtZone(u16),
    /// Source NAT to an address.
    Snat(IpAddr),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `None`: applies to every family of the ruleset; `Some`: only that family.
    pub family: Option<Family>,
    /// Table.
    pub table: Table,
    /// Chain the rule is in.
    pub chain: Chain,
    /// Conditions, in Istio's iptables order.
    pub matches: Vec<Match>,
    /// Action.
    pub target: Target,
    /// Insert at the head of the chain (`-I CHAIN 1`) instead of appending.
    pub insert_first: bool,
    /// Indices into `matches` giving Istio's nft expression order when it differs
    /// from the iptables order; `None` = same order.
    pub nft_order: Option<Vec<usize>>,
}

impl Rule {
    /// An appended rule with matches in the same order for both backends.
    pub fn new(
        family: Option<Family>,
        table: Table,
        chain: Chain,
        matches: Vec<Match>,
        target: Target,
    ) -> Self {
        Self {
            family,
            table,
            chain,
            matches,
            target,
            insert_first: false,
            nft_order: None,
        }
    }

    /// Sets the nft expression order (indices into `matches`).
    pub fn with_nft_order(mut self, order: &[usize]) -> Self {
        self.nft_order = Some(order.to_vec());
        self
    }

    /// Marks the rule as inserted at the chain head.
    pub fn inserted_first(mut self) -> Self {
        self.insert_first = true;
        self
    }

    /// The rule's L4 protocol (from its [`Match::Proto`]), which port matches refer to.
    pub fn l4proto(&self) -> Option<L4> {
        self.matches.iter().find_map(|m| match m {
            Match::Proto(p) => Some(*p),
            _ => None,
        })
    }

    /// The matches in nft expression order.
    pub fn nft_matches(&self) -> Vec<&Match> {
        match &self.nft_order {
            Some(order) => order.iter().filter_map(|&i| self.matches.get(i)).collect(),
            None => self.matches.iter().collect(),
        }
    }

    /// True if the rule is installed for `family`.
    pub fn applies_to(&self, family: Family) -> bool {
        self.family.is_none_or(|f| f == family)
    }
}

/// A whole ruleset for one netns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Families installed (`[V4]` or `[V4, V6]`).
    pub families: Vec<Family>,
    /// Rules in reference order.
    pub rules: Vec<Rule>,
}

impl Ruleset {
    /// Rules installed for one family, in order.
    pub fn rules_for(&self, family: Family) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.applies_to(family))
    }

    /// Tables that hold at least one rule (any family), in `order`.
    pub fn tables_in(&self, order: &[Table]) -> Vec<Table> {
        order
            .iter()
            .copied()
            .filter(|t| self.rules.iter().any(|r| r.table == *t))
            .collect()
    }

    /// True if the ruleset includes `family`.
    pub fn has_family(&self, family: Family) -> bool {
        self.families.contains(&family)
    }
}

/// The loopback host of a family, as Istio writes it (`127.0.0.1/32`, `::1/128`).
pub fn loopback(family: Family) -> Net {
    match family {
        Family::V4 => Net::host_prefixed(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        Family::V6 => Net::host_prefixed(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
    }
}

/// The probe set name of a family.
pub fn probe_set(family: Family) -> &'static str {
    match family {
        Family::V4 => constants::PROBE_SET_V4,
        Family::V6 => constants::PROBE_SET_V6,
    }
}
