//! The policy route that delivers ztunnel's marked replies locally (reference §4.3):
//! `local 0.0.0.0/0 dev lo table 100` (+ `::/0`) and `fwmark 0x111/0xfff pref 32764 lookup 100`.
//!
//! Runs on a thread already inside the target netns. rtnetlink needs a tokio runtime;
//! a current-thread runtime is built here, on this thread, so the netlink socket is
//! created in this netns (a shared runtime's sockets would live in the agent's netns).

use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

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
    F: FnOnce(Handle) -> Fut,
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

fn rule_msg(family: Family) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    m.header.table = ROUTE_TABLE as u8;
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Table(ROUTE_TABLE));
    m.attributes.push(RuleAttribute::FwMark(INPOD_TPROXY_MARK));
    m.attributes.push(RuleAttribute::FwMask(INPOD_TPROXY_MASK));
    m.attributes.push(RuleAttribute::Priority(RULE_PREF));
    m
}

fn route_msg(family: Family) -> RouteMessage {
    match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(LO_IFINDEX)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(LO_IFINDEX)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
    }
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// Installs the route(s) and rule(s); existing identical ones are kept.
pub fn install(ipv6: bool) -> Result<(), RulesError> {
    let v6_route = ipv6_route_wanted(ipv6);
    with_handle(|h| async move {
        let mut fams = vec![Family::V4];
        if ipv6 {
            fams.push(Family::V6);
        }
        for f in fams {
            if f == Family::V4 || v6_route {
                h.route()
                    .add(route_msg(f))
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| {
                        nl_err(
                            format!(
                                "replace local {} route dev lo table {ROUTE_TABLE}",
                                fam_name(f)
                            ),
                            e,
                        )
                    })?;
            }
            let mut req = h.rule().add();
            *req.message_mut() = rule_msg(f);
            match req.execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(nl_err(
                        format!(
                            "add {} rule fwmark 0x111/0xfff pref {RULE_PREF} lookup {ROUTE_TABLE}",
                            fam_name(f)
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    })
}

/// Deletes exactly our route(s) and rule(s), both families; absent ones are fine.
pub fn remove() -> Result<(), RulesError> {
    with_handle(|h| async move {
        for f in [Family::V4, Family::V6] {
            match h.rule().del(rule_msg(f)).execute().await {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        errno(&e),
                        Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT)
                    ) => {}
                Err(e) => return Err(nl_err(format!("delete {} fwmark rule", fam_name(f)), e)),
            }
            match h.route().del(route_msg(f)).execute().await {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        errno(&e),
                        Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
                    ) => {}
                Err(e) => {
                    return Err(nl_err(
                        format!("delete {} local route table {ROUTE_TABLE}", fam_name(f)),
                        e,
                    ))
                }
            }
        }
        Ok(())
    })
}

fn is_our_rule(m: &RuleMessage) -> bool {
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
    table == ROUTE_TABLE
        && mark == Some(INPOD_TPROXY_MARK)
        && mask == Some(INPOD_TPROXY_MASK)
        && prio == Some(RULE_PREF)
        && m.header.action == RuleAction::ToTable
}

fn is_our_route(m: &RouteMessage) -> bool {
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
    table == ROUTE_TABLE
        && m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && !dst_set
        && oif == Some(LO_IFINDEX)
}

/// Reports which of our rules/routes exist: one rule dump and one route dump (both families
/// each), synchronously on this thread's own socket, with no runtime to build: the drift
/// verifier asks this of every held pod each interval.
pub fn state() -> Result<RouteState, RulesError> {
    let sock = RouteDump::open()?;
    let mut st = RouteState::default();
    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Unspec;
    for m in sock.dump(1, RouteNetlinkMessage::GetRule(rule), "dump rules")? {
        if let RouteNetlinkMessage::NewRule(r) = m {
            if is_our_rule(&r) {
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
            if is_our_route(&r) {
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

/// A NETLINK_ROUTE socket in the calling thread's netns, for blocking dumps.
pub(crate) struct RouteDump {
    sock: rtnetlink::sys::Socket,
}

impl RouteDump {
    pub(crate) fn open() -> Result<Self, RulesError> {
        let sock = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
            .map_err(|e| nl_err("open socket", e))?;
        let fd = std::os::fd::AsFd::as_fd(&sock);
        let tv = nix::sys::time::TimeVal::new(NETLINK_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| nl_err("setsockopt(SO_RCVTIMEO)", e))?;
        Ok(Self { sock })
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
