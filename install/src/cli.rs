//! Command-line settings for `ambient-cni-agent install|uninstall|run` (flatten [`InstallArgs`]).
//!
//! Arg ids defined here (do not define them again in a struct that flattens this one; read
//! them from it instead): `cni_bin_dir`, `cni_conf_dir`, `cni_conf_name`, `plugin_binary`,
//! `owned_conf`, `exclude_namespaces`, `agent_socket`, `plugin_timeout_ms`, `plugin_log_level`.

use std::path::{Path, PathBuf};

use crate::entry::{PluginEntry, DEFAULT_AGENT_SOCKET, PLUGIN_BINARY, PLUGIN_TYPE};
use crate::error::InstallError;
use crate::installer::{
    InstallConfig, InstallOutcome, Installer, UninstallOutcome, DEFAULT_OWNED_CONF,
};

/// Where the container image puts the plugin binary.
pub const IMAGE_PLUGIN_PATH: &str = "/opt/ambient-cni/bin/ambient-cni";

/// Installer settings (flags with environment fallbacks).
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Host CNI bin dir, as mounted into the agent.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Host CNI conf dir, as mounted into the agent.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Chain into this file instead of the first valid config (Istio's CNI_CONF_NAME).
    #[arg(long, env = "CNI_CONF_NAME")]
    pub cni_conf_name: Option<String>,
    /// Plugin binary to install [default: `ambient-cni` next to this executable, else
    /// /opt/ambient-cni/bin/ambient-cni].
    #[arg(long, env = "PLUGIN_BINARY")]
    pub plugin_binary: Option<PathBuf>,
    /// Owned mode: keep our own higher-priority conflist (copy of the primary plus our entry)
    /// instead of editing the primary; for CNIs that rewrite their own file (Cilium). Bare flag
    /// or `true` = 02-ambient-cni.conflist; `false` = off.
    #[arg(long, env = "OWNED_CONF", num_args = 0..=1, default_missing_value = "true", value_name = "FILE")]
    pub owned_conf: Option<String>,
    /// Namespaces the plugin passes through without asking the agent (comma list; `-` = none).
    #[arg(long, env = "EXCLUDE_NAMESPACES", default_value = "kube-system")]
    pub exclude_namespaces: String,
    /// The agent's plugin socket.
    #[arg(long, env = "AGENT_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    pub agent_socket: String,
    /// Plugin → agent timeout in milliseconds.
    #[arg(long, env = "PLUGIN_TIMEOUT_MS", default_value_t = crate::entry::DEFAULT_TIMEOUT_MS)]
    pub plugin_timeout_ms: u64,
    /// Plugin log level (error, warn, info, debug).
    #[arg(long, env = "PLUGIN_LOG_LEVEL", default_value = "info")]
    pub plugin_log_level: String,
}

impl InstallArgs {
    /// The excluded namespaces as a list (empty entries dropped; `-` alone = none, because an
    /// empty environment variable counts as unset and would give the default).
    pub fn exclude_namespaces_list(&self) -> Vec<String> {
        parse_list(&self.exclude_namespaces)
    }

    /// The owned conflist name, if owned mode is on.
    pub fn owned_conf_name(&self) -> Option<String> {
        match self.owned_conf.as_deref().map(str::trim) {
            None | Some("") | Some("false") => None,
            Some("true") => Some(DEFAULT_OWNED_CONF.to_string()),
            Some(n) => Some(n.to_string()),
        }
    }

    /// The plugin binary to copy.
    pub fn plugin_source(&self) -> PathBuf {
        if let Some(p) = &self.plugin_binary {
            return p.clone();
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(PLUGIN_BINARY)));
        match beside {
            Some(p) if p.is_file() => p,
            _ => PathBuf::from(IMAGE_PLUGIN_PATH),
        }
    }

    /// Our conflist entry from these settings.
    pub fn entry(&self) -> PluginEntry {
        PluginEntry {
            plugin_type: PLUGIN_TYPE.to_string(),
            name: PLUGIN_TYPE.to_string(),
            agent_socket: self.agent_socket.clone(),
            exclude_namespaces: self.exclude_namespaces_list(),
            timeout_ms: self.plugin_timeout_ms,
            log_level: self.plugin_log_level.clone(),
        }
    }

    /// The installer configuration.
    pub fn to_config(&self) -> InstallConfig {
        InstallConfig {
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            plugin_source: self.plugin_source(),
            owned_conf: self.owned_conf_name(),
            conf_name: self.cni_conf_name.clone().filter(|n| !n.is_empty()),
            entry: self.entry(),
        }
    }

    /// An installer for these settings.
    pub fn installer(&self) -> Result<Installer, InstallError> {
        Installer::new(self.to_config())
    }
}

fn parse_list(s: &str) -> Vec<String> {
    if s.trim() == "-" {
        return Vec::new();
    }
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// `ambient-cni-agent install`: one install pass (binary + config), then exit.
pub fn run_install(args: &InstallArgs) -> Result<InstallOutcome, InstallError> {
    let src = args.plugin_source();
    if !Path::new(&src).is_file() {
        return Err(InstallError::io(
            "find plugin binary",
            src,
            std::io::Error::from_raw_os_error(libc::ENOENT),
        ));
    }
    args.installer()?.install_once()
}

/// `ambient-cni-agent uninstall`: remove our entry / owned file and the binary, then exit.
pub fn run_uninstall(args: &InstallArgs) -> Result<UninstallOutcome, InstallError> {
    args.installer()?.uninstall()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        install: InstallArgs,
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Cli::try_parse_from(["x"]).unwrap().install;
        assert_eq!(c.cni_bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(c.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(c.entry(), PluginEntry::default());
        assert_eq!(c.owned_conf_name(), None);
    }

    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from([
            "x",
            "--owned-conf",
            "--exclude-namespaces",
            " a, b ,,",
            "--plugin-timeout-ms",
            "9",
        ])
        .unwrap()
        .install;
        assert_eq!(c.owned_conf_name().as_deref(), Some(DEFAULT_OWNED_CONF));
        assert_eq!(c.exclude_namespaces_list(), vec!["a", "b"]);
        assert_eq!(c.entry().timeout_ms, 9);
        let c = Cli::try_parse_from(["x", "--owned-conf=00-x.conflist", "--exclude-namespaces=-"])
            .unwrap()
            .install;
        assert_eq!(c.owned_conf_name().as_deref(), Some("00-x.conflist"));
        assert!(c.exclude_namespaces_list().is_empty());
        let c = Cli::try_parse_from(["x", "--owned-conf=false"])
            .unwrap()
            .install;
        assert_eq!(c.owned_conf_name(), None);
    }
}
