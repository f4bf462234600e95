//! What to install: the per-pod redirection options and the host probe options.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::constants::{DEFAULT_PROBE_SNAT_V4, DEFAULT_PROBE_SNAT_V6};

/// Options of the in-pod ruleset (reference §4.2 variants).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodConfig {
    /// Capture DNS (UDP/TCP 53) to ztunnel's DNS proxy and add the raw-table CT zone rules.
    pub dns_capture: bool,
    /// Ingress mode: do not redirect inbound traffic (`ambient.istio.io/bypass-inbound-capture`).
    pub bypass_inbound: bool,
    /// Interfaces whose inbound TCP is rerouted to the outbound port (`istio.io/reroute-virtual-interfaces`).
    pub virtual_interfaces: Vec<String>,
    /// Also install the IPv6 rules (and v6 policy route).
    pub ipv6: bool,
    /// Source address of host probes (accepted unredirected), IPv4.
    pub probe_snat_v4: Ipv4Addr,
    /// Source address of host probes, IPv6.
    pub probe_snat_v6: Ipv6Addr,
}

impl Default for InpodConfig {
    fn default() -> Self {
        Self {
            dns_capture: true,
            bypass_inbound: false,
            virtual_interfaces: Vec::new(),
            ipv6: false,
            probe_snat_v4: DEFAULT_PROBE_SNAT_V4,
            probe_snat_v6: DEFAULT_PROBE_SNAT_V6,
        }
    }
}

/// Options of the host-netns probe SNAT rules (reference §2.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbeConfig {
    /// Also install the IPv6 rule.
    pub ipv6: bool,
    /// SNAT target for IPv4 probes.
    pub probe_snat_v4: Ipv4Addr,
    /// SNAT target for IPv6 probes.
    pub probe_snat_v6: Ipv6Addr,
    /// Kubelet's UID. `None` selects Istio's iptables form (`-m owner --socket-exists`
    /// in `ISTIO_POSTRT`); `Some(uid)` selects Istio's nftables form (`skuid <uid>` in
    /// the `postrouting` base chain), as nft has no `--socket-exists`.
    pub kubelet_uid: Option<u32>,
}

impl Default for HostProbeConfig {
    fn default() -> Self {
        Self {
            ipv6: false,
            probe_snat_v4: DEFAULT_PROBE_SNAT_V4,
            probe_snat_v6: DEFAULT_PROBE_SNAT_V6,
            kubelet_uid: None,
        }
    }
}

impl InpodConfig {
    /// Checks values that end up in rule text (interface names come from pod annotations).
    pub fn validate(&self) -> Result<(), crate::error::RulesError> {
        for name in &self.virtual_interfaces {
            validate_ifname(name)?;
        }
        Ok(())
    }
}

/// Accepts what the kernel accepts as an interface name (`dev_valid_name`), which also
/// keeps names from carrying anything else into a restore batch.
pub fn validate_ifname(name: &str) -> Result<(), crate::error::RulesError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(crate::error::RulesError::Config(format!(
            "invalid interface name {name:?} (1-15 printable characters, no '/', ':' or spaces)"
        )))
    }
}
