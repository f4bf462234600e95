//! The `ambient-cni-agent` command line (flags with environment fallbacks; where
//! Istio's agent has the same setting, Istio's environment name).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::logging::LogFormat;

/// The ambient-cni node agent.
#[derive(Debug, Parser)]
#[command(name = "ambient-cni-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (the DaemonSet's command).
    Run(Box<RunArgs>),
    /// Install the plugin binary and chain it into the primary CNI config, then exit.
    Install(ambient_cni_install::cli::InstallArgs),
    /// Remove our conflist entry (or owned file) and the plugin binary, then exit.
    Uninstall(ambient_cni_install::cli::InstallArgs),
    /// Apply, remove or show the in-pod redirection rules of one netns by hand.
    Redirect(crate::cmd::redirect::RedirectArgs),
    /// Istio's `istio-validation` check for a sidecar pod's netns: exit 0 when its REDIRECT
    /// rules are in place, 126 (with Istio's message) when not. Run as the proxy uid (1337).
    ValidateSidecar(crate::cmd::validate_sidecar::ValidateArgs),
    /// Show what the running agent holds, per pod.
    Status {
        /// The running agent's run dir (its admin socket is there).
        #[arg(long, env = "RUN_DIR", default_value = "/var/run/ambient-cni")]
        run_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Explain why a pod is or is not captured (exit status 1 when it is not healthy).
    Doctor {
        /// The pod, as NAMESPACE/NAME.
        pod: String,
        /// The running agent's run dir.
        #[arg(long, env = "RUN_DIR", default_value = "/var/run/ambient-cni")]
        run_dir: PathBuf,
    },
    /// Change the running agent's log level (`RUST_LOG` syntax).
    LogLevel {
        /// The new level, e.g. `debug` or `info,ambient_cni_agent::mesh=debug`.
        level: String,
        /// The running agent's run dir.
        #[arg(long, env = "RUN_DIR", default_value = "/var/run/ambient-cni")]
        run_dir: PathBuf,
    },
}

/// Logging flags shared by the daemon and the tools.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log level (`RUST_LOG` syntax, e.g. `info` or `ambient_cni_agent=debug`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Where pods come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodSourceKind {
    /// The Kubernetes API (in-cluster config or `KUBECONFIG`).
    Kube,
    /// A directory of Pod/Namespace JSON files (`--local-pods-dir`; tests and the demo).
    Local,
}

/// Which in-pod rules backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// iptables-restore batches (legacy or nft-backed iptables, detected).
    Iptables,
    /// Native nf_tables over netlink.
    Nftables,
    /// nftables when the kernel has nf_tables, else iptables.
    Auto,
}

/// Flags of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// This node's name (downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Installer settings; also the plugin socket (`--agent-socket`) and
    /// `EXCLUDE_NAMESPACES`, shared with the plugin's entry.
    #[command(flatten)]
    pub install: ambient_cni_install::cli::InstallArgs,
    /// Run the installer (copy the plugin, chain it into the CNI config, repair it).
    #[arg(long, env = "INSTALL_CNI", default_value_t = true, action = clap::ArgAction::Set)]
    pub install_cni: bool,
    /// The agent's own DaemonSet (in `POD_NAMESPACE`), read at SIGTERM: present = upgrade
    /// (keep the plugin), gone or being deleted = uninstall (remove it). Empty: always keep.
    #[arg(long, env = "DAEMONSET_NAME", default_value = "ambient-cni-node")]
    pub daemonset_name: String,
    /// The agent's own namespace (downward API), where its DaemonSet is.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    /// The agent's state directory (netns records survive agent restarts here).
    #[arg(long, env = "RUN_DIR", default_value = "/var/run/ambient-cni")]
    pub run_dir: PathBuf,
    /// How often the decisions file beside the plugin socket is rewritten at the latest
    /// (it is also rewritten on every change); keep it well under the plugin's
    /// `decisions_max_age_s` (600 s by default).
    #[arg(long, env = "DECISIONS_REFRESH_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub decisions_refresh_seconds: u64,
    /// Seconds over which the drift verifier checks every held pod's capture once (netns,
    /// in-pod rules, policy route, probe set) and repairs drift; 0 turns it off.
    #[arg(long, env = "VERIFY_INTERVAL", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub verify_interval: u64,
    /// The ZDS socket ztunnel connects to.
    #[arg(
        long,
        env = "ZTUNNEL_UDS_ADDRESS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub ztunnel_uds_address: PathBuf,
    /// Where pods come from.
    #[arg(long, env = "POD_SOURCE", value_enum, default_value = "kube")]
    pub pod_source: PodSourceKind,
    /// Directory of the local pod source.
    #[arg(long, env = "LOCAL_PODS_DIR", required_if_eq("pod_source", "local"))]
    pub local_pods_dir: Option<PathBuf>,
    /// Enablement selectors (YAML list, Istio's shape); Istio's default when empty.
    #[arg(long, env = "AMBIENT_ENABLEMENT_SELECTOR", default_value = "")]
    pub ambient_enablement_selector: String,
    /// Capture pod DNS to ztunnel (pods may override).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ambient_dns_capture: bool,
    /// Program Istio's sidecar redirection into sidecar-injected pods at ADD, as istio-cni
    /// does (the injector's CNI mode, `pilot.cni.enabled`); off leaves them untouched.
    #[arg(long, env = "SIDECAR_MODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub sidecar_mode: bool,
    /// Install IPv6 rules too.
    #[arg(long, env = "AMBIENT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub ambient_ipv6: bool,
    /// Source address kubelet probes are SNATed to (IPv4).
    #[arg(long, env = "HOST_PROBE_SNAT_IP", default_value = "169.254.7.127")]
    pub host_probe_snat_ip: Ipv4Addr,
    /// Source address kubelet probes are SNATed to (IPv6).
    #[arg(
        long,
        env = "HOST_PROBE_SNAT_IPV6",
        default_value = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    )]
    pub host_probe_snat_ipv6: Ipv6Addr,
    /// The uid ztunnel runs as: the only peer the ZDS socket accepts (it hands out
    /// every held pod's netns).
    #[arg(long, env = "ZTUNNEL_UID", default_value_t = 0)]
    pub ztunnel_uid: u32,
    /// The kubelet's uid for the host probe SNAT; found in the host /proc when unset.
    #[arg(long, env = "KUBELET_UID")]
    pub kubelet_uid: Option<u32>,
    /// Where ztunnel runs (its pods are never captured).
    #[arg(long, env = "SYSTEM_NAMESPACE", default_value = "istio-system")]
    pub system_namespace: String,
    /// In-pod rules backend.
    #[arg(long, env = "RULES_BACKEND", value_enum, default_value = "auto")]
    pub rules_backend: BackendChoice,
    /// The host's /proc (`/host/proc` in a pod).
    #[arg(long, env = "HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,
    /// Health port (`/healthz`, `/readyz`): `IP:PORT`, e.g. `127.0.0.1:8000` so only
    /// the node itself (the kubelet) can reach it.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8000")]
    pub health_addr: std::net::SocketAddr,
    /// Prometheus metrics port (`/metrics`): `IP:PORT`.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: std::net::SocketAddr,
    /// Race repair of sidecar pods (Istio's `REPAIR_*` settings).
    #[command(flatten)]
    pub repair: crate::sidecar_repair::settings::RepairArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["ambient-cni-agent", "run", "--node-name", "n"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(a) => Ok(*a),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn health_and_metrics_bind_loopback_the_node_ip_or_everything() {
        let a = run_args(&[]).unwrap();
        assert_eq!(a.health_addr.to_string(), "0.0.0.0:8000");
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:15014");
        for addr in [
            "127.0.0.1:8000",
            "10.1.2.3:8000",
            "[::1]:8000",
            "[fd00::7]:8000",
        ] {
            let a = run_args(&["--health-addr", addr, "--metrics-addr", addr]).unwrap();
            assert_eq!(a.health_addr.to_string(), addr);
            assert_eq!(a.metrics_addr.to_string(), addr);
        }
        // An address, not a name (nothing is resolved), and a port is required.
        for bad in ["localhost:8000", "127.0.0.1", ":8000"] {
            let e = run_args(&["--health-addr", bad]).unwrap_err();
            assert!(e.to_string().contains("--health-addr"), "{e}");
        }
    }

    #[test]
    fn the_daemonset_read_at_stop_is_ours_unless_told() {
        assert_eq!(run_args(&[]).unwrap().daemonset_name, "ambient-cni-node");
        let a = run_args(&["--daemonset-name", "", "--pod-namespace", "mesh"]).unwrap();
        assert_eq!(a.daemonset_name, "");
        assert_eq!(a.pod_namespace, "mesh");
    }
}
