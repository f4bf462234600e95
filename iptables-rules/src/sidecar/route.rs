//! TPROXY mode's policy route, as `istio-iptables` adds it (`tools/common/tproxy`):
//! `fwmark 1337 lookup 133` and `local default dev lo table 133` (IPv6 too when IPv6),
//! plus `::6/128` on `lo` for IPv6 pods. Runs on a thread inside the pod netns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::RouteMessageBuilder;

use super::generate::{TPROXY_MARK, TPROXY_ROUTE_TABLE};
use crate::error::RulesError;
use crate::model::Family;
use crate::route::{errno, nl_err, with_handle, RouteDump, LO_IFINDEX};

/// What of the TPROXY route is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TproxyRoute {
    /// `fwmark 0x539 lookup 133` (IPv4).
    pub rule_v4: bool,
    /// `local 0.0.0.0/0 dev lo table 133`.
    pub route_v4: bool,
    /// The IPv6 rule.
    pub rule_v6: bool,
    /// `local ::/0 dev lo table 133`.
    pub route_v6: bool,
}

impl TproxyRoute {
    /// True when exactly what [`install`] adds for `ipv6` is there.
    pub fn is_complete(&self, ipv6: bool) -> bool {
        self.rule_v4 && self.route_v4 && (!ipv6 || (self.rule_v6 && self.route_v6))
    }
}

fn afam(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn rule_msg(f: Family) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = afam(f);
    m.header.table = TPROXY_ROUTE_TABLE as u8;
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Table(TPROXY_ROUTE_TABLE));
    m.attributes.push(RuleAttribute::FwMark(TPROXY_MARK));
    // Istio sets no mask: the kernel's default, all bits.
    m.attributes.push(RuleAttribute::FwMask(u32::MAX));
    m
}

fn route_msg(f: Family) -> RouteMessage {
    match f {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(LO_IFINDEX)
            .table_id(TPROXY_ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(LO_IFINDEX)
            .table_id(TPROXY_ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
    }
}

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Adds the rule and local route per family; what is already there is kept.
pub fn install(ipv6: bool) -> Result<(), RulesError> {
    let have = state()?;
    with_handle(|h| async move {
        for f in families(ipv6) {
            let (rule, route) = match f {
                Family::V4 => (have.rule_v4, have.route_v4),
                Family::V6 => (have.rule_v6, have.route_v6),
            };
            if !rule {
                let mut req = h.rule().add();
                *req.message_mut() = rule_msg(f);
                req.execute().await.map_err(|e| {
                    nl_err(
                        format!("add {f:?} rule fwmark {TPROXY_MARK} lookup {TPROXY_ROUTE_TABLE}"),
                        e,
                    )
                })?;
            }
            if !route {
                h.route()
                    .add(route_msg(f))
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| {
                        nl_err(
                            format!(
                                "add {f:?} local default route dev lo table {TPROXY_ROUTE_TABLE}"
                            ),
                            e,
                        )
                    })?;
            }
        }
        Ok(())
    })
}

/// Adds `::6/128` on `lo` (Istio's IPv6 inbound passthrough source); present is fine.
pub fn add_inbound_v6_source() -> Result<(), RulesError> {
    with_handle(|h| async move {
        let six = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
        match h.address().add(LO_IFINDEX, six, 128).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err("add ::6/128 dev lo", e)),
        }
    })
}

/// Deletes the rule and routes of both families; absent ones are fine (rollback).
pub fn remove() -> Result<(), RulesError> {
    with_handle(|h| async move {
        for f in [Family::V4, Family::V6] {
            let gone = |e: &rtnetlink::Error| {
                matches!(
                    errno(e),
                    Some(libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
                )
            };
            if let Err(e) = h.rule().del(rule_msg(f)).execute().await {
                if !gone(&e) {
                    return Err(nl_err(format!("delete {f:?} fwmark {TPROXY_MARK} rule"), e));
                }
            }
            if let Err(e) = h.route().del(route_msg(f)).execute().await {
                if !gone(&e) {
                    return Err(nl_err(
                        format!("delete {f:?} local route table {TPROXY_ROUTE_TABLE}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    })
}

fn is_ours_rule(m: &RuleMessage) -> bool {
    let mut table = u32::from(m.header.table);
    let (mut mark, mut mask) = (None, None);
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            _ => {}
        }
    }
    table == TPROXY_ROUTE_TABLE
        && mark == Some(TPROXY_MARK)
        && mask.unwrap_or(u32::MAX) == u32::MAX
        && m.header.action == RuleAction::ToTable
}

fn is_ours_route(m: &RouteMessage) -> bool {
    let mut table = u32::from(m.header.table);
    let mut oif = None;
    let mut dst = false;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(_) => dst = true,
            _ => {}
        }
    }
    table == TPROXY_ROUTE_TABLE
        && m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && !dst
        && oif == Some(LO_IFINDEX)
}

/// Which parts of the TPROXY route exist (one rule dump, one route dump).
pub fn state() -> Result<TproxyRoute, RulesError> {
    let sock = RouteDump::open()?;
    let mut st = TproxyRoute::default();
    let mut rule = RuleMessage::default();
    rule.header.family = AddressFamily::Unspec;
    for m in sock.dump(1, RouteNetlinkMessage::GetRule(rule), "dump rules")? {
        if let RouteNetlinkMessage::NewRule(r) = m {
            if is_ours_rule(&r) {
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
            if is_ours_route(&r) {
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
