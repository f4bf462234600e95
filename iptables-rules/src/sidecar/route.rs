//! TPROXY mode's policy route, as `istio-iptables` adds it (`tools/common/tproxy`):
//! `fwmark 1337 lookup 133` and `local default dev lo table 133` (IPv6 too when IPv6),
//! plus `::6/128` on `lo` for IPv6 pods. Runs on a thread inside the pod netns.

use std::net::{IpAddr, Ipv6Addr};

use super::generate::{TPROXY_MARK, TPROXY_ROUTE_TABLE};
use crate::error::RulesError;
use crate::route::{errno, nl_err, with_handle, PolicyRoute, RouteState, LO_IFINDEX};

/// Istio's TPROXY route: no mask (all bits) and no preference of its own.
const TPROXY: PolicyRoute = PolicyRoute {
    table: TPROXY_ROUTE_TABLE,
    mark: TPROXY_MARK,
    mask: u32::MAX,
    prio: None,
};

/// Adds the rule and local route per family (IPv6 too when `ipv6`); what is there is kept.
pub fn install(ipv6: bool) -> Result<(), RulesError> {
    TPROXY.install(ipv6, ipv6)
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
    TPROXY.remove()
}

/// Which parts of the TPROXY route exist (one rule dump, one route dump).
pub fn state() -> Result<RouteState, RulesError> {
    TPROXY.state()
}

/// True when exactly what [`install`] adds for `ipv6` is there.
pub fn is_complete(ipv6: bool) -> Result<bool, RulesError> {
    Ok(state()?.is_complete(ipv6, ipv6))
}
