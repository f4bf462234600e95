//! An nf_tables transaction: `BATCH_BEGIN`, object messages, `BATCH_END`, applied atomically by
//! the kernel (all or nothing). Each message asks for an ACK so a failure can be pinned on the
//! object that caused it.

use super::attr::Writer;
use super::consts::*;
use super::expr::Expr;

/// Base-chain type (`type filter|nat|route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    /// `filter`
    Filter,
    /// `nat`
    Nat,
    /// `route` (re-routes on mark changes in output)
    Route,
}

impl ChainType {
    /// The kernel's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Filter => "filter",
            Self::Nat => "nat",
            Self::Route => "route",
        }
    }
}

/// Netfilter hook a base chain attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `prerouting`
    Prerouting,
    /// `input`
    Input,
    /// `forward`
    Forward,
    /// `output`
    Output,
    /// `postrouting`
    Postrouting,
}

impl Hook {
    /// `NF_INET_*` number.
    pub fn num(self) -> u32 {
        match self {
            Self::Prerouting => NF_INET_PRE_ROUTING,
            Self::Input => NF_INET_LOCAL_IN,
            Self::Forward => NF_INET_FORWARD,
            Self::Output => NF_INET_LOCAL_OUT,
            Self::Postrouting => NF_INET_POST_ROUTING,
        }
    }
}

/// Hook, type and priority of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    /// Chain type.
    pub ty: ChainType,
    /// Hook.
    pub hook: Hook,
    /// Priority (lower runs first).
    pub priority: i32,
}

/// Key type of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    /// `ipv4_addr`
    Ipv4Addr,
    /// `ipv6_addr`
    Ipv6Addr,
}

impl SetKey {
    fn nft_type(self) -> u32 {
        match self {
            Self::Ipv4Addr => NFT_TYPE_IPADDR,
            Self::Ipv6Addr => NFT_TYPE_IP6ADDR,
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> u32 {
        match self {
            Self::Ipv4Addr => 4,
            Self::Ipv6Addr => 16,
        }
    }
}

/// One set element: key bytes (network order) and an optional comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    /// Key as it sits in the register (addresses in network order).
    pub key: Vec<u8>,
    /// `comment "..."` (stored as element user data, as nft does).
    pub comment: Option<String>,
}

/// A transaction under construction. Sequence numbers are assigned when it is sent.
#[derive(Debug)]
pub struct Batch {
    w: Writer,
    /// Start offset of each object message (for seq patching), with a label naming the object.
    pub(crate) msgs: Vec<(usize, String)>,
    next_set_id: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty transaction (`BATCH_BEGIN` written).
    pub fn new() -> Self {
        let mut w = Writer::with_capacity(4096);
        let m = w.begin_msg(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        w.end_msg(m);
        Self {
            w,
            msgs: Vec::new(),
            next_set_id: 1,
        }
    }

    /// Number of object messages so far.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// True if no object message was added.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn begin(&mut self, ty: u16, flags: u16, family: u8, label: String) -> usize {
        let start = self.w.begin_msg(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            0,
            family,
            0,
        );
        self.msgs.push((start, label));
        start
    }

    /// `add table <family> <name>` (no error if it exists).
    pub fn add_table(&mut self, family: u8, name: &str) {
        let m = self.begin(
            NFT_MSG_NEWTABLE,
            0,
            family,
            format!("add table {} {name}", fam(family)),
        );
        self.w.attr_str(NFTA_TABLE_NAME, name);
        self.w.attr_be32(NFTA_TABLE_FLAGS, 0);
        self.w.end_msg(m);
    }

    /// `delete table <family> <name>` (with its chains, rules and sets; fails if absent).
    pub fn delete_table(&mut self, family: u8, name: &str) {
        let m = self.begin(
            NFT_MSG_DELTABLE,
            0,
            family,
            format!("delete table {} {name}", fam(family)),
        );
        self.w.attr_str(NFTA_TABLE_NAME, name);
        self.w.end_msg(m);
    }

    /// `flush table <family> <name>`: delete every rule of the table, keeping chains and sets
    /// (what nft sends: a rule deletion naming only the table).
    pub fn flush_table(&mut self, family: u8, name: &str) {
        let m = self.begin(
            NFT_MSG_DELRULE,
            0,
            family,
            format!("flush table {} {name}", fam(family)),
        );
        self.w.attr_str(NFTA_RULE_TABLE, name);
        self.w.end_msg(m);
    }

    /// `add chain <family> <table> <name> [{ type .. hook .. priority .. ; }]` (no error if it exists
    /// with the same hook).
    pub fn add_chain(&mut self, family: u8, table: &str, name: &str, base: Option<BaseChain>) {
        let m = self.begin(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            family,
            format!("add chain {} {table} {name}", fam(family)),
        );
        self.w.attr_str(NFTA_CHAIN_TABLE, table);
        self.w.attr_str(NFTA_CHAIN_NAME, name);
        if let Some(b) = base {
            self.w.attr_str(NFTA_CHAIN_TYPE, b.ty.as_str());
            let h = self.w.begin_nest(NFTA_CHAIN_HOOK);
            self.w.attr_be32(NFTA_HOOK_HOOKNUM, b.hook.num());
            self.w.attr(NFTA_HOOK_PRIORITY, &b.priority.to_be_bytes());
            self.w.end_nest(h);
        }
        self.w.end_msg(m);
    }

    /// `add rule <family> <table> <chain> <exprs>` (appended at the end of the chain).
    pub fn add_rule(&mut self, family: u8, table: &str, chain: &str, exprs: &[Expr]) {
        let n = self
            .msgs
            .iter()
            .filter(|(_, l)| l.starts_with("add rule"))
            .count()
            + 1;
        let m = self.begin(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            family,
            format!(
                "add rule {} {table} {chain} (rule #{n} of this batch)",
                fam(family)
            ),
        );
        self.w.attr_str(NFTA_RULE_TABLE, table);
        self.w.attr_str(NFTA_RULE_CHAIN, chain);
        let l = self.w.begin_nest(NFTA_RULE_EXPRESSIONS);
        for e in exprs {
            e.encode(&mut self.w);
        }
        self.w.end_nest(l);
        self.w.end_msg(m);
    }

    /// `add set <family> <table> <name> { type <key> ; }` (no error if it exists).
    pub fn add_set(&mut self, family: u8, table: &str, name: &str, key: SetKey) {
        let m = self.begin(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            family,
            format!("add set {} {table} {name}", fam(family)),
        );
        self.w.attr_str(NFTA_SET_TABLE, table);
        self.w.attr_str(NFTA_SET_NAME, name);
        self.w.attr_be32(NFTA_SET_FLAGS, 0);
        self.w.attr_be32(NFTA_SET_KEY_TYPE, key.nft_type());
        self.w.attr_be32(NFTA_SET_KEY_LEN, key.key_len());
        self.w.attr_be32(NFTA_SET_ID, self.next_set_id);
        self.next_set_id += 1;
        // nft's set user data: key byte order, so `nft list` prints keys as addresses.
        let mut ud = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
        ud.extend_from_slice(&NFT_BYTEORDER_BIG_ENDIAN.to_ne_bytes());
        self.w.attr(NFTA_SET_USERDATA, &ud);
        self.w.end_msg(m);
    }

    /// `add element <family> <table> <set> { ... }` (existing keys are left as they are).
    pub fn add_elements(&mut self, family: u8, table: &str, set: &str, elems: &[SetElem]) {
        self.elements(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            "add",
            family,
            table,
            set,
            elems,
        );
    }

    /// `delete element <family> <table> <set> { ... }` (fails if a key is absent).
    pub fn delete_elements(&mut self, family: u8, table: &str, set: &str, elems: &[SetElem]) {
        self.elements(NFT_MSG_DELSETELEM, 0, "delete", family, table, set, elems);
    }

    #[allow(clippy::too_many_arguments)]
    fn elements(
        &mut self,
        ty: u16,
        flags: u16,
        verb: &str,
        family: u8,
        table: &str,
        set: &str,
        elems: &[SetElem],
    ) {
        let m = self.begin(
            ty,
            flags,
            family,
            format!("{verb} element {} {table} {set}", fam(family)),
        );
        self.w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        self.w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let list = self.w.begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elems {
            let el = self.w.begin_nest(NFTA_LIST_ELEM);
            let k = self.w.begin_nest(NFTA_SET_ELEM_KEY);
            self.w.attr(NFTA_DATA_VALUE, &e.key);
            self.w.end_nest(k);
            if let Some(c) = &e.comment {
                self.w.attr(NFTA_SET_ELEM_USERDATA, &elem_comment_udata(c));
            }
            self.w.end_nest(el);
        }
        self.w.end_nest(list);
        self.w.end_msg(m);
    }

    /// Appends `BATCH_END` and returns the wire bytes and the message starts/labels.
    pub(crate) fn finish(mut self) -> (Vec<u8>, Vec<(usize, String)>) {
        let m = self.w.begin_msg(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.w.end_msg(m);
        (self.w.into_bytes(), self.msgs)
    }
}

/// Element comment as libnftnl stores it: TLV `{type 0, len, "text\0"}` (comments are capped at
/// 128 bytes by nft; longer text is cut at a char boundary).
pub(crate) fn elem_comment_udata(c: &str) -> Vec<u8> {
    let mut end = c.len().min(127);
    while !c.is_char_boundary(end) {
        end -= 1;
    }
    let mut ud = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (end + 1) as u8];
    ud.extend_from_slice(&c.as_bytes()[..end]);
    ud.push(0);
    ud
}

/// Reads the comment back out of element user data.
pub(crate) fn elem_comment_from_udata(ud: &[u8]) -> Option<String> {
    let mut rest = ud;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let val = rest.get(2..2 + len)?;
        if ty == NFTNL_UDATA_SET_ELEM_COMMENT {
            let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
            return std::str::from_utf8(&val[..end]).ok().map(str::to_owned);
        }
        rest = &rest[2 + len..];
    }
    None
}

/// nft's family keyword, for labels.
pub(crate) fn fam(family: u8) -> &'static str {
    match family {
        NFPROTO_INET => "inet",
        NFPROTO_IPV4 => "ip",
        NFPROTO_IPV6 => "ip6",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::super::attr::Msgs;
    use super::*;

    #[test]
    fn batch_is_framed_and_every_object_asks_for_an_ack() {
        let mut b = Batch::new();
        b.add_table(NFPROTO_INET, "t");
        b.flush_table(NFPROTO_INET, "t");
        b.add_chain(
            NFPROTO_INET,
            "t",
            "prerouting",
            Some(BaseChain {
                ty: ChainType::Nat,
                hook: Hook::Prerouting,
                priority: -100,
            }),
        );
        b.add_rule(NFPROTO_INET, "t", "prerouting", &[Expr::Counter]);
        assert_eq!(b.len(), 4);
        let (bytes, labels) = b.finish();
        let msgs: Vec<_> = Msgs(&bytes).collect();
        assert_eq!(msgs.len(), 6);
        assert_eq!(msgs[0].ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(&msgs[0].body[2..4], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
        assert_eq!(msgs[5].ty, NFNL_MSG_BATCH_END);
        for m in &msgs[1..5] {
            assert_ne!(m.flags & NLM_F_ACK, 0);
        }
        assert_eq!(msgs[1].ty, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE);
        assert_eq!(msgs[2].ty, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE);
        assert_eq!(labels[2].1, "add chain inet t prerouting");
        // The priority is a signed big-endian 32-bit value.
        let hook = msgs[3]
            .nft_attrs()
            .find(|a| a.ty == NFTA_CHAIN_HOOK)
            .unwrap();
        let prio = hook.nested().find(|a| a.ty == NFTA_HOOK_PRIORITY).unwrap();
        assert_eq!(prio.payload, &(-100i32).to_be_bytes());
    }

    #[test]
    fn element_comment_udata_round_trips_and_matches_nft() {
        assert_eq!(elem_comment_udata("uid-1"), b"\x00\x06uid-1\x00");
        assert_eq!(
            elem_comment_from_udata(b"\x00\x06uid-1\x00").as_deref(),
            Some("uid-1")
        );
        let long = "x".repeat(300);
        assert_eq!(
            elem_comment_from_udata(&elem_comment_udata(&long))
                .unwrap()
                .len(),
            127
        );
    }
}
