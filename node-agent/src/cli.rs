//! The `ambient-cni-agent` command line (flags with environment fallbacks).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    Run(RunArgs),
    /// Apply, remove or show the in-pod redirection rules of one netns by hand.
    Redirect(crate::cmd::redirect::RedirectArgs),
    /// Show what the running agent holds, per pod.
    Status,
    /// Explain why a pod is or is not captured.
    Doctor {
        /// The pod, as NAMESPACE/NAME.
        pod: String,
    },
    /// Run the local demo (real netns pods, the real CNI chain, the agent, a ztunnel stand-in).
    Demo,
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

/// Flags of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// This node's name (downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The socket the plugin talks to.
    #[arg(long, env = "PLUGIN_SOCKET", default_value = "/var/run/ambient-cni/plugin.sock")]
    pub plugin_socket: PathBuf,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}
