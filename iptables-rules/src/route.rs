//! The policy route that delivers ztunnel's marked replies locally (reference §4.3):
//! `local 0.0.0.0/0 dev lo table 100` (+ `::/0`) and `fwmark 0x111/0xfff pref 32764 lookup 100`.
//!
//! Runs on a thread already inside the target netns, on a blocking NETLINK_ROUTE socket
//! opened there: an install or a removal is one datagram carrying every request, and one
//! ACK per request (no async runtime to build per pod).

use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::RouteMessageBuilder;

use crate::constants::{INPOD_TPROXY_MARK, INPOD_TPROXY_MASK, ROUTE_TABLE, RULE_PREF};
use crate::error::RulesError;
use crate::model::Family;

/// The loopback interface's index, fixed in every netns.
pub(crate) const LO_IFINDEX: u32 = 1;

/// What of the policy route is present, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteState {
    /// `fwmark 0x111/0xfff pref 32764 lookup 100` (IPv4).
    pub rule_v4: bool,
    /// Same rule, IPv6.
    pub rule_v6: bool,
    /// `local 0.0.0.0/0 dev lo table 100`.
    pub route_v4: bool,
    /// `local ::/0 dev lo table 100`.
    pub route_v6: bool,
}

impl RouteState {
    /// True if nothing of ours is present.
    pub fn is_empty(&self) -> bool {
        *self == RouteState::default()
    }

    /// True if exactly what `install(ipv6)` puts in place is present (`v6_route` as computed
    /// by [`ipv6_route_wanted`]).
    pub fn is_complete(&self, ipv6: bool, v6_route: bool) -> bool {
        self.rule_v4 && self.route_v4 && (!ipv6 || (self.rule_v6 && self.route_v6 == v6_route))
    }
}

/// True if the IPv6 local route should be installed: IPv6 on and not disabled on `lo`.
pub fn ipv6_route_wanted(ipv6: bool) -> bool {
    ipv6 && std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
        .map(|s| s.trim() != "1")
        .unwrap_or(false)
}

pub(crate) fn nl_err(op: impl Into<String>, e: impl std::fmt::Display) -> RulesError {
    RulesError::Netlink {
        backend: "route".into(),
        op: op.into(),
        reason: e.to_string(),
    }
}

/// The errno of a netlink error reply, if it is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// How long the kernel may take to answer one batch of route/rule requests.
const NETLINK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `f` with a netlink handle on a current-thread runtime created on this thread.
pub(crate) fn with_handle<T, F, Fut>(f: F) -> Result<T, RulesError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, RulesError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| nl_err("create runtime", e))?;
    rt.block_on(async move {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| nl_err("open socket", e))?;
        let task = tokio::spawn(conn);
        // The kernel answers route requests at once; a missing answer is a fault, not a wait.
        let out = tokio::time::timeout(NETLINK_TIMEOUT, f(handle))
            .await
            .unwrap_or_else(|_| {
                Err(RulesError::Timeout {
                    backend: "route".into(),
                    what: "netlink route/rule request".into(),
                    after: NETLINK_TIMEOUT,
                })
            });
        task.abort();
        out
    })
}

/// A mark-selected local delivery, per family: `fwmark <mark>/<mask> [pref <prio>] lookup
/// <table>` and `local default dev lo table <table>`. The ambient in-pod route and sidecar
/// TPROXY mode's are two of these.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PolicyRoute {
    /// The routing table.
    pub table: u32,
    /// The fwmark the rule selects.
    pub mark: u32,
    /// Its mask (`u32::MAX`: all bits, the kernel's default).
    pub mask: u32,
    /// The rule's preference; `None` lets the kernel pick one (and any is ours).
    pub prio: Option<u32>,
}

/// The ambient in-pod route (reference §4.3).
pub(crate) const INPOD: PolicyRoute = PolicyRoute {
    table: ROUTE_TABLE,
    mark: INPOD_TPROXY_MARK,
    mask: INPOD_TPROXY_MASK,
    prio: Some(RULE_PREF),
};

impl PolicyRoute {
    fn rule_msg(&self, family: Family) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = match family {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        };
        m.header.table = self.table as u8;
        m.header.action = RuleAction::ToTable;
        m.attributes.push(RuleAttribute::Table(self.table));
        m.attributes.push(RuleAttribute::FwMark(self.mark));
        m.attributes.push(RuleAttribute::FwMask(self.mask));
        if let Some(p) = self.prio {
            m.attributes.push(RuleAttribute::Priority(p));
        }
        m
    }

    fn route_msg(&self, family: Family) -> RouteMessage {
        match family {
            Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(LO_IFINDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
            Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(LO_IFINDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build(),
        }
    }

    /// The rule as `ip rule` prints it, for errors.
    fn rule_text(&self) -> String {
        let pref = self.prio.map(|p| format!(" pref {p}")).unwrap_or_default();
        format!(
            "fwmark {:#x}/{:#x}{pref} lookup {}",
            self.mark, self.mask, self.table
        )
    }

    /// Installs the IPv4 route and rule, and the IPv6 rule (and route when `v6_route`) when
    /// `ipv6`, in one datagram; identical ones already there are kept.
    pub(crate) fn install(&self, ipv6: bool, v6_route: bool) -> Result<(), RulesError> {
        use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
        // Without a preference the kernel picks a fresh one per add, so EXCL cannot see a
        // twin: look first.
        let have = match self.prio {
            None => Some(self.state()?),
            Some(_) => None,
        };
        let mut reqs = Vec::new();
        let fams: &[Family] = if ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &f in fams {
            if f == Family::V4 || v6_route {
                reqs.push(Req {
                    flags: NLM_F_CREATE | NLM_F_REPLACE,
                    msg: RouteNetlinkMessage::NewRoute(self.route_msg(f)),
                    what: format!(
                        "replace local {} route dev lo table {}",
                        fam_name(f),
                        self.table
                    ),
                    fine: &[],
                });
            }
            let present = have.is_some_and(|h| match f {
                Family::V4 => h.rule_v4,
                Family::V6 => h.rule_v6,
            });
            if present {
                continue;
            }
            reqs.push(Req {
                flags: NLM_F_CREATE | NLM_F_EXCL,
                msg: RouteNetlinkMessage::NewRule(self.rule_msg(f)),
                what: format!("add {} rule {}", fam_name(f), self.rule_text()),
                fine: &[libc::EEXIST],
            });
        }
        RouteSock::open()?.transact(reqs)
    }

    /// Deletes exactly this route's rules and routes, both families; absent ones are fine.
    pub(crate) fn remove(&self) -> Result<(), RulesError> {
        let mut reqs = Vec::new();
        for f in [Family::V4, Family::V6] {
            reqs.push(Req {
                flags: 0,
                msg: RouteNetlinkMessage::DelRule(self.rule_msg(f)),
                what: format!("delete {} rule {}", fam_name(f), self.rule_text()),
                fine: &[libc::ENOENT, libc::ESRCH, libc::EAFNOSUPPORT],
            });
            reqs.push(Req {
                flags: 0,
                msg: RouteNetlinkMessage::DelRoute(self.route_msg(f)),
                what: format!("delete {} local route table {}", fam_name(f), self.table),
                fine: &[
                    libc::ENOENT,
                    libc::ESRCH,
                    libc::EAFNOSUPPORT,
                    libc::EOPNOTSUPP,
                ],
            });
        }
        RouteSock::open()?.transact(reqs)
    }

    fn is_rule(&self, m: &RuleMessage) -> bool {
        let mut table = u32::from(m.header.table);
        let (mut mark, mut mask, mut prio) = (None, None, None);
        for a in &m.attributes {
            match a {
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::FwMark(v) => mark = Some(*v),
                RuleAttribute::FwMask(v) => mask = Some(*v),
                RuleAttribute::Priority(v) => prio = Some(*v),
                _ => {}
            }
        }
        table == self.table
            && mark == Some(self.mark)
            && mask.unwrap_or(u32::MAX) == self.mask
            && (self.prio.is_none() || prio == self.prio)
            && m.header.action == RuleAction::ToTable
    }

    fn is_route(&self, m: &RouteMessage) -> bool {
        let mut table = u32::from(m.header.table);
        let mut oif = None;
        let mut dst_set = false;
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Destination(_) => dst_set = true,
                _ => {}
            }
        }
        table == self.table
            && m.header.kind == RouteType::Local
            && m.header.destination_prefix_length == 0
            && !dst_set
            && oif == Some(LO_IFINDEX)
    }

    /// Which of this route's rules/routes exist: one rule dump and one route dump (both
    /// families each), synchronously on this thread's own socket.
    pub(crate) fn state(&self) -> Result<RouteState, RulesError> {
        let sock = RouteSock::open()?;
        let mut st = RouteState::default();
        let mut rule = RuleMessage::default();
        rule.header.family = AddressFamily::Unspec;
        for m in sock.dump(1, RouteNetlinkMessage::GetRule(rule), "dump rules")? {
            if let RouteNetlinkMessage::NewRule(r) = m {
                if self.is_rule(&r) {
                    match r.header.family {
                        AddressFamily::Inet => st.rule_v4 = true,
                        AddressFamily::Inet6 => st.rule_v6 = true,
                        _ => {}
                    }
                }
            }
        }
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Unspec;
        for m in sock.dump(2, RouteNetlinkMessage::GetRoute(route), "dump routes")? {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                if self.is_route(&r) {
                    match r.header.address_family {
                        AddressFamily::Inet => st.route_v4 = true,
                        AddressFamily::Inet6 => st.route_v6 = true,
                        _ => {}
                    }
                }
            }
        }
        Ok(st)
    }
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// One request of an install or removal: its flags, message, what it does (for errors) and
/// the errnos that mean "already as wanted".
struct Req {
    flags: u16,
    msg: RouteNetlinkMessage,
    what: String,
    fine: &'static [i32],
}

/// Installs the route(s) and rule(s); existing identical ones are kept.
pub fn install(ipv6: bool) -> Result<(), RulesError> {
    INPOD.install(ipv6, ipv6_route_wanted(ipv6))
}

/// Deletes exactly our route(s) and rule(s), both families; absent ones are fine.
pub fn remove() -> Result<(), RulesError> {
    INPOD.remove()
}

/// Reports which of our rules/routes exist: one rule dump and one route dump (both families
/// each), synchronously on this thread's own socket, with no runtime to build: the drift
/// verifier asks this of every held pod each interval.
pub fn state() -> Result<RouteState, RulesError> {
    INPOD.state()
}

/// A NETLINK_ROUTE socket in the calling thread's netns, for blocking requests and dumps.
pub(crate) struct RouteSock {
    sock: rtnetlink::sys::Socket,
}

impl RouteSock {
    pub(crate) fn open() -> Result<Self, RulesError> {
        let sock = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
            .map_err(|e| nl_err("open socket", e))?;
        let fd = std::os::fd::AsFd::as_fd(&sock);
        let tv = nix::sys::time::TimeVal::new(NETLINK_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| nl_err("setsockopt(SO_RCVTIMEO)", e))?;
        Ok(Self { sock })
    }

    /// Sends every request in one datagram (the kernel runs them in order) and waits for
    /// each one's ACK; the first request that failed with an errno not in its `fine` list is
    /// the error.
    fn transact(&self, reqs: Vec<Req>) -> Result<(), RulesError> {
        use rtnetlink::packet_core::{
            NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
        };
        if reqs.is_empty() {
            return Ok(());
        }
        let mut out_buf = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | r.flags;
            header.sequence_number = i as u32 + 1;
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(r.msg.clone()));
            msg.finalize();
            let start = out_buf.len();
            out_buf.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut out_buf[start..]);
        }
        self.sock
            .send(&out_buf, 0)
            .map_err(|e| nl_err("send route/rule requests", e))?;
        let mut errnos: Vec<Option<i32>> = vec![None; reqs.len()];
        let mut pending = reqs.len();
        let mut buf = vec![0u8; 16 * 1024];
        while pending > 0 {
            let n = self
                .sock
                .recv(&mut &mut buf[..], 0)
                .map_err(|e| nl_err("route/rule request replies: recv", e))?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                    .map_err(|e| nl_err("route/rule request reply", e))?;
                let len = m.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                let i = m.header.sequence_number as usize;
                if let NetlinkPayload::Error(e) = m.payload {
                    if (1..=reqs.len()).contains(&i) && errnos[i - 1].is_none() {
                        errnos[i - 1] = Some(e.code.map_or(0, |c| -c.get()));
                        pending -= 1;
                    }
                }
            }
        }
        for (r, errno) in reqs.iter().zip(errnos) {
            match errno {
                Some(0) | None => {}
                Some(e) if r.fine.contains(&e) => {}
                Some(e) => {
                    return Err(nl_err(r.what.clone(), std::io::Error::from_raw_os_error(e)))
                }
            }
        }
        Ok(())
    }

    /// Sends one dump request and collects its replies up to `NLMSG_DONE`; a family the kernel
    /// does not support (IPv6 off) is an empty answer.
    pub(crate) fn dump(
        &self,
        seq: u32,
        req: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, RulesError> {
        use rtnetlink::packet_core::{
            NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        let mut out_buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out_buf);
        self.sock
            .send(&out_buf, 0)
            .map_err(|e| nl_err(format!("{what}: send"), e))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        loop {
            let n = self
                .sock
                .recv(&mut &mut buf[..], 0)
                .map_err(|e| nl_err(format!("{what}: recv"), e))?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                    .map_err(|e| nl_err(what, e))?;
                let len = m.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code.map(|c| -c.get()) {
                            None | Some(libc::EAFNOSUPPORT) => Ok(out),
                            Some(errno) => {
                                Err(nl_err(what, std::io::Error::from_raw_os_error(errno)))
                            }
                        };
                    }
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    _ => {}
                }
            }
        }
    }
}

/// `ip`-style text of what [`install`] adds, for reports.
pub fn describe(ipv6: bool) -> Vec<String> {
    let mut v = vec![
        format!("ip rule fwmark {INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x} pref {RULE_PREF} lookup {ROUTE_TABLE}"),
        format!("ip route local 0.0.0.0/0 dev lo table {ROUTE_TABLE}"),
    ];
    if ipv6 {
        v.push(format!("ip -6 rule fwmark {INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x} pref {RULE_PREF} lookup {ROUTE_TABLE}"));
        v.push(format!("ip -6 route local ::/0 dev lo table {ROUTE_TABLE}"));
    }
    v
}
