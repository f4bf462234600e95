//! `ambient-cni-agent redirect apply|remove|show --netns PATH`: the in-pod rules of one
//! netns by hand (debugging, tests), through the same `Redirector` the agent uses.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use iptables_rules::backend::{self, BackendKind};
use iptables_rules::constants::{DEFAULT_PROBE_SNAT_V4, DEFAULT_PROBE_SNAT_V6};
use iptables_rules::netns::Netns;
use iptables_rules::{InpodConfig, Redirector, Report};

/// Flags of `redirect`.
#[derive(Debug, clap::Args)]
pub struct RedirectArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: RedirectAction,
}

/// `redirect` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RedirectAction {
    /// Install the rules and policy route (idempotent).
    Apply(RedirectOpts),
    /// Remove them (absent state is fine).
    Remove(RedirectOpts),
    /// Print what is installed and whether it matches these options.
    Show(RedirectOpts),
}

/// Options shared by the `redirect` subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct RedirectOpts {
    /// The pod netns (e.g. /var/run/netns/NAME or /proc/PID/ns/net); never the host's.
    #[arg(long)]
    pub netns: PathBuf,
    /// Rules backend.
    #[arg(long, env = "RULES_BACKEND", default_value = "iptables", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// Capture DNS to ztunnel's DNS proxy (`--dns-capture=false` to turn off).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,
    /// Also install IPv6 rules.
    #[arg(long, env = "AMBIENT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,
    /// Do not redirect inbound traffic (ingress mode).
    #[arg(long)]
    pub bypass_inbound: bool,
    /// Interfaces whose inbound TCP goes to the outbound port, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub virtual_interfaces: Vec<String>,
    /// Host probe SNAT address (IPv4).
    #[arg(long, env = "HOST_PROBE_SNAT_IP", default_value_t = DEFAULT_PROBE_SNAT_V4)]
    pub probe_snat_ip: Ipv4Addr,
    /// Host probe SNAT address (IPv6).
    #[arg(long, env = "HOST_PROBE_SNAT_IPV6", default_value_t = DEFAULT_PROBE_SNAT_V6)]
    pub probe_snat_ipv6: Ipv6Addr,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse::<BackendKind>().map_err(|e| e.to_string())
}

impl RedirectOpts {
    /// The rules configuration these flags describe.
    pub fn config(&self) -> InpodConfig {
        InpodConfig {
            dns_capture: self.dns_capture,
            bypass_inbound: self.bypass_inbound,
            virtual_interfaces: self.virtual_interfaces.clone(),
            ipv6: self.ipv6,
            probe_snat_v4: self.probe_snat_ip,
            probe_snat_v6: self.probe_snat_ipv6,
        }
    }
}

/// Runs `redirect`.
pub fn run(args: RedirectArgs) -> anyhow::Result<()> {
    let (opts, action) = match &args.action {
        RedirectAction::Apply(o) => (o, "apply"),
        RedirectAction::Remove(o) => (o, "remove"),
        RedirectAction::Show(o) => (o, "show"),
    };
    let host = Netns::host_id(Path::new("/proc")).context("identifying the host netns")?;
    let ns = Netns::open(&opts.netns, Some(host))?;
    // Detection runs here, in the host netns, as the agent does at start.
    let backend =
        backend::make(opts.backend).with_context(|| format!("backend {}", opts.backend))?;
    let redirector = Redirector::new(backend);
    let cfg = opts.config();
    match action {
        "apply" => redirector.apply(&ns, &cfg)?,
        "remove" => redirector.remove(&ns, &cfg)?,
        _ => {
            let report = redirector.show(&ns, &cfg)?;
            print!("{}", format_report(&report));
        }
    }
    Ok(())
}

/// Human-readable `show` output.
pub fn format_report(r: &Report) -> String {
    let mut s = format!(
        "netns {}\nbackend {}\ncomplete {}\n",
        r.netns, r.installed.backend, r.complete
    );
    for sec in &r.installed.sections {
        s.push_str(&format!("[{}]\n", sec.name));
        for l in &sec.lines {
            s.push_str(&format!("  {l}\n"));
        }
    }
    s.push_str(&format!(
        "route: rule v4 {} v6 {}, local route table 100 v4 {} v6 {}\n",
        r.route.rule_v4, r.route.rule_v6, r.route.route_v4, r.route.route_v6
    ));
    s
}
