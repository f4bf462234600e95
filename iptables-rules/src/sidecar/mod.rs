//! Istio's sidecar-mode redirection: the rules `istio-init` would install, programmed
//! inside an injected pod's netns at ADD (istio-cni's sidecar mode).
//!
//! The agent reads a pod into [`SidecarInputs`] (pure data, no Kubernetes types here);
//! [`SidecarConfig::from_inputs`] applies Istio's names, defaults and validation;
//! [`SidecarRedirector`] installs the rules with either backend.
//!
//! Files: [`params`] (pure parsing and validation), [`generate`] (pure rule generation,
//! Istio's restore payload), [`canon`] (pure save form, for "already installed"),
//! [`apply`] (iptables effects), [`nft`] (pure nftables form), [`nft_apply`] (its
//! effects), [`route`] (TPROXY's policy route).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;

use crate::backend::iptables::Iptables;
use crate::backend::BackendKind;
use crate::error::RulesError;
use crate::model::Family;
use crate::netns::Netns;

pub mod apply;
pub mod canon;
pub mod generate;
pub mod nft;
pub mod nft_apply;
pub mod params;
pub mod route;

/// What the agent reads off a sidecar pod for its redirection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarInputs {
    /// `namespace/name`, for errors.
    pub pod: String,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The `istio-proxy` container's literal env values (`ISTIO_META_DNS_CAPTURE`, ...).
    pub proxy_env: BTreeMap<String, String>,
    /// `istio-proxy` `securityContext.runAsUser` (1337 when unset or 0).
    pub proxy_uid: Option<i64>,
    /// `istio-proxy` `securityContext.runAsGroup` (1337 when unset or 0).
    pub proxy_gid: Option<i64>,
    /// The pod's addresses (from prevResult; the IPv6 decision reads them, order aside).
    pub pod_ips: Vec<IpAddr>,
}

/// An annotation or env value Istio would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: {key}={value:?}: {reason}")]
pub struct ParamError {
    /// `namespace/name`.
    pub pod: String,
    /// The annotation or env name.
    pub key: String,
    /// The value given.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

/// Inbound interception mode (`sidecar.istio.io/interceptionMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// NAT `REDIRECT` to 15006 (default).
    Redirect,
    /// `TPROXY` to 15006 in mangle, with the `fwmark 1337 lookup 133` route.
    Tproxy,
}

impl Mode {
    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redirect => "REDIRECT",
            Mode::Tproxy => "TPROXY",
        }
    }
}

/// Which inbound ports are captured (`includeInboundPorts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// `*`: all but the excluded ports (default).
    All,
    /// Only these.
    Ports(Vec<u16>),
    /// Empty annotation: no inbound capture.
    None,
}

/// Which outbound destinations are captured (`includeOutboundIPRanges`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundRanges {
    /// `*` (default).
    All,
    /// Only these (empty: none).
    Cidrs(Vec<Prefix>),
}

/// An `addr/len` as written in an annotation (Istio prints it back unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The address as written.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

/// A validated sidecar redirection (Istio's `Redirect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    pod: String,
    mode: Mode,
    proxy_uid: u32,
    proxy_gid: u32,
    include_outbound: OutboundRanges,
    exclude_outbound_cidrs: Vec<Prefix>,
    include_inbound: Inbound,
    exclude_inbound_ports: Vec<u16>,
    include_outbound_ports: Vec<u16>,
    exclude_outbound_ports: Vec<u16>,
    exclude_interfaces: Vec<String>,
    reroute_virtual_interfaces: Vec<String>,
    dns_capture: bool,
    invalid_drop: bool,
    ipv6: bool,
}

impl SidecarConfig {
    /// Istio's defaults and validation applied to one pod's inputs.
    pub fn from_inputs(inputs: &SidecarInputs) -> Result<Self, ParamError> {
        params::parse(inputs)
    }

    /// One line for logs and Events (mode, owner, ranges, ports).
    pub fn summary(&self) -> String {
        let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let inbound = match &self.include_inbound {
            Inbound::All => "*".to_owned(),
            Inbound::Ports(p) => join(p),
            Inbound::None => "none".to_owned(),
        };
        let outbound = match &self.include_outbound {
            OutboundRanges::All => "*".to_owned(),
            OutboundRanges::Cidrs(c) => c
                .iter()
                .map(Prefix::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        let excl_cidrs = self
            .exclude_outbound_cidrs
            .iter()
            .map(Prefix::to_string)
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "sidecar redirection for {}: mode {}, owner {}/{}, outbound {outbound} (excluding [{excl_cidrs}], ports [{}]), \
             inbound {inbound} (excluding ports [{}]), dns capture {}, {}",
            self.pod,
            self.mode.as_str(),
            self.proxy_uid,
            self.proxy_gid,
            join(&self.exclude_outbound_ports),
            join(&self.exclude_inbound_ports),
            if self.dns_capture { "on" } else { "off" },
            if self.ipv6 { "IPv4+IPv6" } else { "IPv4" },
        )
    }

    /// The pod (`namespace/name`).
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// REDIRECT or TPROXY.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The proxy's UID (whose traffic is not captured).
    pub fn proxy_uid(&self) -> u32 {
        self.proxy_uid
    }

    /// The proxy's GID.
    pub fn proxy_gid(&self) -> u32 {
        self.proxy_gid
    }

    /// True when IPv6 rules are installed too (Istio's decision from the pod's addresses).
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// True when DNS (port 53) is captured to 15053.
    pub fn dns_capture(&self) -> bool {
        self.dns_capture
    }

    /// The `iptables-restore` payload Istio's CNI plugin would program for `family`
    /// (empty for IPv6 unless [`Self::ipv6`]).
    pub fn iptables_restore(&self, family: Family) -> String {
        generate::restore_for(self, family)
    }
}

/// What [`SidecarRedirector::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The rules were installed (atomically).
    Installed,
    /// Exactly these rules were already there (re-ADD); nothing was written.
    AlreadyPresent,
}

/// The iptables binaries, detected once per process (like the ambient backend's flavour).
fn iptables() -> Result<&'static Iptables, RulesError> {
    static DETECTED: OnceLock<Result<Iptables, String>> = OnceLock::new();
    DETECTED
        .get_or_init(|| Iptables::detect().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| RulesError::NotAvailable {
            backend: "iptables".into(),
            reason: reason.clone(),
        })
}

/// Installs sidecar rules with one backend.
#[derive(Debug, Clone, Copy)]
pub struct SidecarRedirector {
    kind: BackendKind,
}

impl SidecarRedirector {
    /// A redirector for `kind`. For iptables this detects the flavour now (once per
    /// process), so call it at start in the host netns, not first on a pod's ADD.
    pub fn new(kind: BackendKind) -> Self {
        if kind == BackendKind::Iptables {
            // A detection failure is reported by every apply/matches.
            let _ = iptables();
        }
        Self { kind }
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Installs `cfg` in `ns` all or nothing; a no-op when exactly these rules are there.
    /// A different config on a pod with rules replaces them (one batch per family).
    pub fn apply(&self, ns: &Netns, cfg: &SidecarConfig) -> Result<Applied, RulesError> {
        match self.kind {
            BackendKind::Iptables => apply::apply_iptables(iptables()?, ns, cfg),
            BackendKind::Nftables => nft_apply::apply_nft(ns, cfg),
        }
    }

    /// True when exactly `cfg`'s rules (and route, for TPROXY) are installed in `ns`.
    pub fn matches(&self, ns: &Netns, cfg: &SidecarConfig) -> Result<bool, RulesError> {
        match self.kind {
            BackendKind::Iptables => apply::matches_iptables(iptables()?, ns, cfg),
            BackendKind::Nftables => nft_apply::matches_nft(ns, cfg),
        }
    }
}
