//! Our plugin's entry in the chained conflist (the keys of `docs/contract.md`).

use serde::Serialize;
use serde_json::Value;

/// The `type` (and default `name`) of our conflist entry.
pub const PLUGIN_TYPE: &str = "ambient-cni";
/// The plugin binary's file name in the CNI bin dir.
pub const PLUGIN_BINARY: &str = "ambient-cni";
/// Default agent socket the plugin talks to.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambient-cni/plugin.sock";
/// Default plugin → agent timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// The plugin's conflist entry. Field order is the serialised key order; there is
/// deliberately no `cniVersion` (the list's own version applies). No `agent_namespace` /
/// `agent_pod_prefix` any more: the agent runs with hostNetwork and needs no CNI exemption
/// (the plugin still accepts, and ignores, the keys older installers wrote).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginEntry {
    /// Always [`PLUGIN_TYPE`].
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Entry name (libcni ignores per-plugin names inside a list).
    pub name: String,
    /// Unix socket of the node agent.
    pub agent_socket: String,
    /// Namespaces the plugin passes through without asking the agent.
    pub exclude_namespaces: Vec<String>,
    /// Plugin → agent timeout in milliseconds.
    pub timeout_ms: u64,
    /// Plugin log level.
    pub log_level: String,
}

impl Default for PluginEntry {
    fn default() -> Self {
        PluginEntry {
            plugin_type: PLUGIN_TYPE.to_string(),
            name: PLUGIN_TYPE.to_string(),
            agent_socket: DEFAULT_AGENT_SOCKET.to_string(),
            exclude_namespaces: vec!["kube-system".to_string()],
            timeout_ms: DEFAULT_TIMEOUT_MS,
            log_level: "info".to_string(),
        }
    }
}

impl PluginEntry {
    /// The entry as a JSON value (for comparisons against what a file holds).
    pub fn to_value(&self) -> Value {
        // Serialising a plain struct of strings and numbers cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Whether `v` is a conflist plugin entry of our type.
    pub fn is_ours(v: &Value) -> bool {
        v.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{entry_state, insert, EntryState};

    #[test]
    fn an_entry_of_an_older_installer_is_replaced_without_the_agent_pod_keys() {
        let old = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"ambient-cni","name":"ambient-cni","agent_socket":"/var/run/ambient-cni/plugin.sock","exclude_namespaces":["kube-system"],"agent_namespace":"istio-system","agent_pod_prefix":"ambient-cni-node-","timeout_ms":5000,"log_level":"info"}]}"#;
        let entry = PluginEntry::default();
        assert_eq!(entry_state(old, &entry).unwrap(), EntryState::Stale);
        let new = insert(old, &entry).unwrap();
        assert_eq!(entry_state(&new, &entry).unwrap(), EntryState::Current);
        assert!(
            !new.contains("agent_namespace") && !new.contains("agent_pod_prefix"),
            "{new}"
        );
    }
}
