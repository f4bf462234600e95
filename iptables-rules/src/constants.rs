//! Istio's ambient constants (reference §4.1, §2.6, §4.6); ztunnel depends on these values.

/// Mark ztunnel puts on its own sockets (`InpodMark`, 1337).
pub const INPOD_MARK: u32 = 0x539;
/// Mask for [`INPOD_MARK`].
pub const INPOD_MASK: u32 = 0xfff;
/// Connmark/fwmark steering replies back to ztunnel (`InpodTProxyMark`).
pub const INPOD_TPROXY_MARK: u32 = 0x111;
/// Mask for [`INPOD_TPROXY_MARK`].
pub const INPOD_TPROXY_MASK: u32 = 0xfff;
/// nfmask/ctmask of the connmark restore (`InpodRestoreMask`).
pub const INPOD_RESTORE_MASK: u32 = 0xffff_ffff;
/// Policy routing table for marked replies (`RouteTableInbound`).
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `fwmark 0x111/0xfff lookup 100` rule.
pub const RULE_PREF: u32 = 32764;
/// ztunnel's outbound capture port.
pub const PORT_OUTBOUND: u16 = 15001;
/// ztunnel's inbound plaintext capture port.
pub const PORT_INBOUND_PLAINTEXT: u16 = 15006;
/// ztunnel's HBONE inbound port (never redirected).
pub const PORT_INBOUND_HBONE: u16 = 15008;
/// ztunnel's DNS proxy port.
pub const PORT_DNS_PROXY: u16 = 15053;
/// DNS port captured when DNS capture is on.
pub const PORT_DNS: u16 = 53;
/// Conntrack zone for ztunnel's upstream DNS (istio/istio#33469).
pub const DNS_CT_ZONE: u16 = 1;

/// Default host-probe SNAT address (IPv4), `HOST_PROBE_SNAT_IP`.
pub const DEFAULT_PROBE_SNAT_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
/// Default host-probe SNAT address (IPv6), `HOST_PROBE_SNAT_IPV6`.
pub const DEFAULT_PROBE_SNAT_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// iptables chain names.
pub mod chain {
    /// In-pod prerouting chain.
    pub const ISTIO_PRERT: &str = "ISTIO_PRERT";
    /// In-pod output chain.
    pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
    /// Host postrouting chain (probe SNAT).
    pub const ISTIO_POSTRT: &str = "ISTIO_POSTRT";
}

/// nftables (family `inet`) table and chain names.
pub mod nft {
    /// NAT table (in-pod; also the host probe table).
    pub const TABLE_NAT: &str = "istio-ambient-nat";
    /// Mangle table.
    pub const TABLE_MANGLE: &str = "istio-ambient-mangle";
    /// Raw table.
    pub const TABLE_RAW: &str = "istio-ambient-raw";
    /// Regular chain jumped to from `prerouting`.
    pub const CHAIN_ISTIO_PREROUTING: &str = "istio-prerouting";
    /// Regular chain jumped to from `output`.
    pub const CHAIN_ISTIO_OUTPUT: &str = "istio-output";
}

/// ipset / nft set of pod IPs whose probes are SNATed (IPv4).
pub const PROBE_SET_V4: &str = "istio-inpod-probes-v4";
/// ipset / nft set of pod IPs whose probes are SNATed (IPv6).
pub const PROBE_SET_V6: &str = "istio-inpod-probes-v6";
