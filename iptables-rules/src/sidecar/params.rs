//! Pure parsing of a sidecar pod's annotations and proxy env into a [`SidecarConfig`],
//! with Istio's names, defaults and validation (istio-cni `sidecar_redirect.go`,
//! `tools/common/config`).

use std::net::IpAddr;

use super::{Inbound, Mode, OutboundRanges, ParamError, Prefix, SidecarConfig, SidecarInputs};

/// `sidecar.istio.io/interceptionMode`: `REDIRECT` (default) or `TPROXY`.
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
/// `traffic.sidecar.istio.io/includeOutboundIPRanges` (default `*`).
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
/// `traffic.sidecar.istio.io/excludeOutboundIPRanges` (default none).
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// `traffic.sidecar.istio.io/includeInboundPorts` (default `*`).
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
/// `traffic.sidecar.istio.io/excludeInboundPorts` (15020, 15021, 15090 always appended).
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// `traffic.sidecar.istio.io/includeOutboundPorts` (default none).
pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
/// `traffic.sidecar.istio.io/excludeOutboundPorts` (default 15020 when absent).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// `traffic.sidecar.istio.io/excludeInterfaces` (default none).
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// `istio.io/reroute-virtual-interfaces` (default none).
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// `traffic.sidecar.istio.io/kubevirtInterfaces`: deprecated spelling of the above,
/// read only when the new one is absent.
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
/// istio-proxy env: capture DNS (UDP/TCP 53) to 15053.
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
/// istio-proxy env: any IPv6 pod address enables IPv6 rules.
pub const ENV_DUAL_STACK: &str = "ISTIO_DUAL_STACK";
/// istio-proxy env: drop conntrack-INVALID packets.
pub const ENV_INVALID_DROP: &str = "INVALID_DROP";

/// The owner UID/GID when the istio-proxy container sets none (or 0).
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// Inbound ports always excluded (status, health, Prometheus), appended as Istio does.
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 3] = [15020, 15021, 15090];
/// Outbound port excluded when the annotation is absent (the proxy's status port).
pub const DEFAULT_EXCLUDED_OUTBOUND: u16 = 15020;

/// Istio's defaults and validation applied to `inputs`.
pub(super) fn parse(inputs: &SidecarInputs) -> Result<SidecarConfig, ParamError> {
    let p = Parser { inputs };
    let mode = match p.annotation(INTERCEPTION_MODE) {
        None => Mode::Redirect,
        Some("REDIRECT") => Mode::Redirect,
        Some("TPROXY") => Mode::Tproxy,
        Some(v) => {
            return Err(p.err(
                INTERCEPTION_MODE,
                v,
                "interception mode must be REDIRECT or TPROXY",
            ))
        }
    };
    let include_outbound = match p.annotation(INCLUDE_OUTBOUND_IP_RANGES) {
        None | Some("*") => OutboundRanges::All,
        Some(v) => OutboundRanges::Cidrs(p.cidrs(INCLUDE_OUTBOUND_IP_RANGES, v)?),
    };
    let exclude_outbound_cidrs = match p.annotation(EXCLUDE_OUTBOUND_IP_RANGES) {
        None => Vec::new(),
        Some(v) => p.cidrs(EXCLUDE_OUTBOUND_IP_RANGES, v)?,
    };
    let mut exclude_inbound_ports = match p.annotation(EXCLUDE_INBOUND_PORTS) {
        // Istio's default for the annotation is 15020, which the appended list repeats.
        None => Vec::new(),
        Some(v) => p.ports(EXCLUDE_INBOUND_PORTS, v)?,
    };
    exclude_inbound_ports.extend(ALWAYS_EXCLUDED_INBOUND);
    dedup_keep_order(&mut exclude_inbound_ports);
    let include_inbound = match p.annotation(INCLUDE_INBOUND_PORTS) {
        None | Some("*") => Inbound::All,
        Some(v) if v.trim().is_empty() => Inbound::None,
        Some(v) => Inbound::Ports(p.ports(INCLUDE_INBOUND_PORTS, v)?),
    };
    let exclude_outbound_ports = match p.annotation(EXCLUDE_OUTBOUND_PORTS) {
        None => vec![DEFAULT_EXCLUDED_OUTBOUND],
        Some(v) => p.ports(EXCLUDE_OUTBOUND_PORTS, v)?,
    };
    let include_outbound_ports = match p.annotation(INCLUDE_OUTBOUND_PORTS) {
        None => Vec::new(),
        Some(v) => p.ports(INCLUDE_OUTBOUND_PORTS, v)?,
    };
    let exclude_interfaces = match p.annotation(EXCLUDE_INTERFACES) {
        None => Vec::new(),
        Some(v) => p.interfaces(EXCLUDE_INTERFACES, v)?,
    };
    let reroute_virtual_interfaces = match (
        p.annotation(REROUTE_VIRTUAL_INTERFACES),
        p.annotation(KUBEVIRT_INTERFACES),
    ) {
        (Some(v), _) => p.interfaces(REROUTE_VIRTUAL_INTERFACES, v)?,
        (None, Some(v)) => p.interfaces(KUBEVIRT_INTERFACES, v)?,
        (None, None) => Vec::new(),
    };
    let dns_capture = p.env_bool(ENV_DNS_CAPTURE);
    let dual_stack = p.env_bool(ENV_DUAL_STACK);
    let invalid_drop = p.env_bool(ENV_INVALID_DROP);
    let ipv6 = ipv6_decision(&inputs.pod_ips, dual_stack).ok_or_else(|| ParamError {
        pod: inputs.pod.clone(),
        key: "pod IPs".into(),
        value: String::new(),
        reason: "no usable pod address (not loopback, not link-local) to decide IPv4/IPv6 from"
            .into(),
    })?;
    Ok(SidecarConfig {
        pod: inputs.pod.clone(),
        mode,
        proxy_uid: owner_id(inputs.proxy_uid),
        proxy_gid: owner_id(inputs.proxy_gid),
        include_outbound,
        exclude_outbound_cidrs,
        include_inbound,
        exclude_inbound_ports,
        include_outbound_ports,
        exclude_outbound_ports,
        exclude_interfaces,
        reroute_virtual_interfaces,
        dns_capture,
        invalid_drop,
        ipv6,
    })
}

/// Istio's IPv6 decision (`getLocalIP`): the first address, in the kernel's address-dump
/// order, that is not loopback or link-local decides; with `ISTIO_DUAL_STACK`, any such
/// IPv6 address means IPv6. The kernel dumps every IPv4 address before any IPv6 one, so
/// a pod with a usable IPv4 address is IPv4 unless dual stack is on, whatever the order
/// the CNI result lists them in. None when there is no usable address (Istio fails then).
pub fn ipv6_decision(pod_ips: &[IpAddr], dual_stack: bool) -> Option<bool> {
    let usable: Vec<IpAddr> = pod_ips
        .iter()
        .map(unmap)
        .filter(|a| match a {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(v6) => {
                let seg0 = v6.segments()[0];
                // fe80::/10 unicast, ff02::/16 link-local multicast.
                !v6.is_loopback() && (seg0 & 0xffc0) != 0xfe80 && (seg0 & 0xff0f) != 0xff02
            }
        })
        .collect();
    if usable.is_empty() {
        return None;
    }
    let any_v6 = usable.iter().any(IpAddr::is_ipv6);
    let any_v4 = usable.iter().any(IpAddr::is_ipv4);
    Some(if dual_stack { any_v6 } else { !any_v4 })
}

fn unmap(a: &IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(*v6)),
        v4 => *v4,
    }
}

/// `runAsUser`/`runAsGroup` as Istio reads it: unset or 0 means 1337.
fn owner_id(id: Option<i64>) -> u32 {
    match id {
        Some(v) if v != 0 => u32::try_from(v).unwrap_or(DEFAULT_PROXY_ID),
        _ => DEFAULT_PROXY_ID,
    }
}

fn dedup_keep_order(ports: &mut Vec<u16>) {
    let mut seen = std::collections::BTreeSet::new();
    ports.retain(|p| seen.insert(*p));
}

struct Parser<'a> {
    inputs: &'a SidecarInputs,
}

impl Parser<'_> {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.inputs.annotations.get(key).map(String::as_str)
    }

    fn err(&self, key: &str, value: &str, reason: impl Into<String>) -> ParamError {
        ParamError {
            pod: self.inputs.pod.clone(),
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }

    /// Go's `strconv.ParseBool`; anything else is false (Istio logs a warning and goes on).
    fn env_bool(&self, key: &str) -> bool {
        matches!(
            self.inputs.proxy_env.get(key).map(String::as_str),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }

    /// A comma-separated port list (empty entries skipped, entries trimmed).
    fn ports(&self, key: &str, value: &str) -> Result<Vec<u16>, ParamError> {
        if value.trim() == "*" {
            // Istio's validator lets `*` through here, then iptables-restore fails on it.
            return Err(self.err(key, value, "`*` is only valid for includeInboundPorts"));
        }
        let mut out = Vec::new();
        for part in value.trim().split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(self.err(key, value, format!("port {part:?} is not a number")));
            }
            let port = part
                .parse::<u16>()
                .map_err(|_| self.err(key, value, format!("port {part:?} is out of range")))?;
            out.push(port);
        }
        Ok(out)
    }

    /// A comma-separated CIDR list, each `addr/bits` (Go's `netip.ParsePrefix`).
    fn cidrs(&self, key: &str, value: &str) -> Result<Vec<Prefix>, ParamError> {
        let mut out = Vec::new();
        if value.is_empty() {
            return Ok(out);
        }
        for part in value.split(',') {
            if part.is_empty() {
                continue;
            }
            let bad = |why: &str| self.err(key, value, format!("CIDR {part:?}: {why}"));
            let (addr, bits) = part
                .split_once('/')
                .ok_or_else(|| bad("missing /prefix length"))?;
            let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = (!bits.is_empty()
                && bits.bytes().all(|b| b.is_ascii_digit())
                && (bits == "0" || !bits.starts_with('0')))
            .then(|| bits.parse::<u8>().ok())
            .flatten()
            .filter(|l| *l <= max)
            .ok_or_else(|| bad(&format!("prefix length must be 0..={max}")))?;
            out.push(Prefix { addr, len });
        }
        Ok(out)
    }

    /// A comma-separated interface list (`ValidateInterfaceNames`).
    fn interfaces(&self, key: &str, value: &str) -> Result<Vec<String>, ParamError> {
        let mut out = Vec::new();
        if value.is_empty() {
            return Ok(out);
        }
        for part in value.split(',') {
            let name = part.trim();
            if name.is_empty() {
                return Err(self.err(key, value, "empty interface name"));
            }
            if name.len() > 15 {
                return Err(self.err(
                    key,
                    value,
                    format!("interface name {name:?} too long (max 15 chars)"),
                ));
            }
            let mut bytes = name.bytes();
            let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
            if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
                return Err(self.err(
                    key,
                    value,
                    format!("interface name {name:?} contains invalid characters"),
                ));
            }
            out.push(name.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::SidecarConfig;

    fn inputs(ann: &[(&str, &str)], env: &[(&str, &str)]) -> SidecarInputs {
        SidecarInputs {
            pod: "ns1/pod1".into(),
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proxy_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proxy_uid: None,
            proxy_gid: None,
            pod_ips: vec!["10.244.0.5".parse().unwrap()],
        }
    }

    #[test]
    fn defaults_are_istios() {
        let c = SidecarConfig::from_inputs(&inputs(&[], &[])).unwrap();
        assert_eq!(c.mode(), Mode::Redirect);
        assert_eq!((c.proxy_uid(), c.proxy_gid()), (1337, 1337));
        assert_eq!(c.include_outbound, OutboundRanges::All);
        assert_eq!(c.include_inbound, Inbound::All);
        assert_eq!(c.exclude_inbound_ports, vec![15020, 15021, 15090]);
        assert_eq!(c.exclude_outbound_ports, vec![15020]);
        assert!(c.include_outbound_ports.is_empty() && c.exclude_outbound_cidrs.is_empty());
        assert!(!c.dns_capture() && !c.invalid_drop && !c.ipv6());
    }

    #[test]
    fn annotations_are_read() {
        let c = SidecarConfig::from_inputs(&inputs(
            &[
                (INTERCEPTION_MODE, "TPROXY"),
                (INCLUDE_OUTBOUND_IP_RANGES, "127.0.0.0/8,fd00::/8"),
                (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8"),
                (INCLUDE_INBOUND_PORTS, "1111, 2222"),
                (EXCLUDE_INBOUND_PORTS, "3333,15021"),
                (EXCLUDE_OUTBOUND_PORTS, ""),
                (INCLUDE_OUTBOUND_PORTS, "7777"),
                (EXCLUDE_INTERFACES, "eth1"),
                (KUBEVIRT_INTERFACES, "old0"),
            ],
            &[
                (ENV_DNS_CAPTURE, "true"),
                (ENV_INVALID_DROP, "1"),
                (ENV_DUAL_STACK, "yes"),
            ],
        ))
        .unwrap();
        assert_eq!(c.mode(), Mode::Tproxy);
        assert_eq!(
            c.include_outbound,
            OutboundRanges::Cidrs(vec![
                Prefix {
                    addr: "127.0.0.0".parse().unwrap(),
                    len: 8
                },
                Prefix {
                    addr: "fd00::".parse().unwrap(),
                    len: 8
                }
            ])
        );
        assert_eq!(c.include_inbound, Inbound::Ports(vec![1111, 2222]));
        assert_eq!(c.exclude_inbound_ports, vec![3333, 15021, 15020, 15090]);
        assert!(c.exclude_outbound_ports.is_empty());
        assert_eq!(c.include_outbound_ports, vec![7777]);
        assert_eq!(c.exclude_interfaces, vec!["eth1".to_string()]);
        assert_eq!(c.reroute_virtual_interfaces, vec!["old0".to_string()]);
        assert!(c.dns_capture() && c.invalid_drop);
        // "yes" is not a Go bool: dual stack stays off (Istio warns and goes on).
        assert!(!c.ipv6());
        let both = inputs(
            &[
                (REROUTE_VIRTUAL_INTERFACES, "new0"),
                (KUBEVIRT_INTERFACES, "old0"),
            ],
            &[],
        );
        let c = SidecarConfig::from_inputs(&both).unwrap();
        assert_eq!(c.reroute_virtual_interfaces, vec!["new0".to_string()]);
    }

    #[test]
    fn summary_names_the_pod_and_the_essentials() {
        let c = SidecarConfig::from_inputs(&inputs(
            &[(EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8")],
            &[(ENV_DNS_CAPTURE, "true")],
        ))
        .unwrap();
        assert_eq!(
            c.summary(),
            "sidecar redirection for ns1/pod1: mode REDIRECT, owner 1337/1337, outbound * \
             (excluding [10.0.0.0/8], ports [15020]), inbound * (excluding ports \
             [15020,15021,15090]), dns capture on, IPv4"
        );
    }

    #[test]
    fn owner_falls_back_to_1337_when_unset_or_root() {
        for (uid, want) in [
            (None, 1337),
            (Some(0), 1337),
            (Some(1000670000), 1000670000),
        ] {
            let mut i = inputs(&[], &[]);
            i.proxy_uid = uid;
            i.proxy_gid = uid.map(|u| if u == 0 { 0 } else { u + 1 });
            let c = SidecarConfig::from_inputs(&i).unwrap();
            assert_eq!(c.proxy_uid(), want);
            assert_eq!(c.proxy_gid(), if want == 1337 { 1337 } else { want + 1 });
        }
    }

    #[test]
    fn bad_values_are_refused_naming_pod_key_and_value() {
        let cases: [(&str, &str, &str); 10] = [
            (EXCLUDE_INBOUND_PORTS, "80,http", "is not a number"),
            (INCLUDE_INBOUND_PORTS, "70000", "out of range"),
            (
                EXCLUDE_OUTBOUND_PORTS,
                "*",
                "only valid for includeInboundPorts",
            ),
            (INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "prefix length"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0", "missing /prefix"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "*", "missing /prefix"),
            (
                INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.300/8",
                "not an IP address",
            ),
            (EXCLUDE_INTERFACES, "eth0,0bad", "invalid characters"),
            (
                REROUTE_VIRTUAL_INTERFACES,
                "averyveryverylongname",
                "too long",
            ),
            (INTERCEPTION_MODE, "NONE", "REDIRECT or TPROXY"),
        ];
        for (key, value, why) in cases {
            let err = SidecarConfig::from_inputs(&inputs(&[(key, value)], &[])).unwrap_err();
            assert_eq!((err.key.as_str(), err.value.as_str()), (key, value));
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("pod ns1/pod1: {key}=")) && msg.contains(why),
                "{msg}"
            );
        }
    }

    #[test]
    fn ipv6_is_decided_as_istio_does() {
        let a = |s: &str| -> IpAddr { s.parse().unwrap() };
        let cases: [(&[IpAddr], bool, Option<bool>); 8] = [
            (&[a("10.0.0.1"), a("fd00::1")], false, Some(false)),
            (&[a("fd00::1"), a("10.0.0.1")], false, Some(false)),
            (&[a("fd00::1")], false, Some(true)),
            (&[a("10.0.0.1"), a("fd00::1")], true, Some(true)),
            (&[a("10.0.0.1")], true, Some(false)),
            (
                &[a("fe80::1"), a("127.0.0.1"), a("10.0.0.1")],
                false,
                Some(false),
            ),
            (&[a("::ffff:10.0.0.1")], false, Some(false)),
            (&[a("fe80::1")], false, None),
        ];
        for (ips, dual, want) in cases {
            assert_eq!(ipv6_decision(ips, dual), want, "{ips:?} dual={dual}");
        }
        let mut i = inputs(&[], &[]);
        i.pod_ips.clear();
        let err = SidecarConfig::from_inputs(&i).unwrap_err();
        assert!(err.to_string().contains("no usable pod address"), "{err}");
    }
}
