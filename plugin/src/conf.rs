//! The network configuration on stdin: the spec's keys plus ours (contract § Conflist entry).

use serde_json::{Map, Value};

use crate::error::{CniError, DECODE, INVALID_CONFIG};
use crate::version::SpecVersion;

/// Largest stdin we accept; a real conf is a few KiB.
pub const MAX_STDIN: usize = 1 << 20;

/// Default agent socket.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambient-cni/plugin.sock";
/// Default time budget for one agent exchange.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Default age beyond which the agent's decisions file is not trusted (10 minutes: longer
/// than an agent upgrade or a crash-loop backoff, short enough that a namespace labelled
/// while the agent is down is not treated as plain for long).
pub const DEFAULT_DECISIONS_MAX_AGE_S: u64 = 600;
/// Largest `decisions_max_age_s` accepted (one day).
pub const MAX_DECISIONS_MAX_AGE_S: u64 = 86_400;

/// Log levels of the plugin (stderr only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and errors.
    Warn,
    /// Informational.
    Info,
    /// Everything.
    Debug,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" | "none" => Self::Off,
            "error" => Self::Error,
            "warn" | "warning" => Self::Warn,
            "info" => Self::Info,
            "debug" | "trace" => Self::Debug,
            _ => return None,
        })
    }
}

/// The parsed configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    /// `cniVersion`.
    pub version: SpecVersion,
    /// `name`.
    pub name: String,
    /// `type`.
    pub plugin_type: String,
    /// `prevResult`, raw (decoded separately).
    pub prev_result: Option<Value>,
    /// `agent_socket`.
    pub agent_socket: String,
    /// `exclude_namespaces`.
    pub exclude_namespaces: Vec<String>,
    /// `timeout_ms`.
    pub timeout_ms: u64,
    /// `log_level`.
    pub log_level: LogLevel,
    /// `status_requires_agent`: STATUS fails (50) while the agent is down or not ready.
    pub status_requires_agent: bool,
    /// `decisions_max_age_s`: how old the agent's decisions file may be (0: never used).
    pub decisions_max_age_s: u64,
    /// The whole object (GC reads `cni.dev/valid-attachments` from it).
    pub raw: Map<String, Value>,
}

/// Only the version, for choosing the error JSON's `cniVersion` when the rest is bad.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

fn string_key(obj: &Map<String, Value>, key: &str, default: &str) -> Result<String, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default.to_owned()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(CniError::new(
            INVALID_CONFIG,
            format!("{key} must be a string, got {other}"),
        )),
    }
}

fn bool_key(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(CniError::new(
            INVALID_CONFIG,
            format!("{key} must be true or false, got {other}"),
        )),
    }
}

impl NetConf {
    /// Parses stdin into a conf; errors carry the spec's codes.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.len() > MAX_STDIN {
            return Err(CniError::new(
                DECODE,
                format!(
                    "network configuration too large ({} bytes, limit {MAX_STDIN})",
                    stdin.len()
                ),
            ));
        }
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::new(
                DECODE,
                "empty network configuration on stdin",
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(DECODE, "network configuration is not valid JSON")
                .with_details(e.to_string())
        })?;
        let Value::Object(obj) = value else {
            return Err(CniError::new(
                DECODE,
                "network configuration must be a JSON object",
            ));
        };
        let version = match obj.get("cniVersion") {
            Some(Value::String(s)) => SpecVersion::parse(s)?,
            None => SpecVersion::parse("0.1.0")?,
            Some(other) => {
                return Err(CniError::new(
                    INVALID_CONFIG,
                    format!("cniVersion must be a string, got {other}"),
                ))
            }
        };
        let name = string_key(&obj, "name", "")?;
        if name.is_empty() {
            return Err(CniError::new(
                INVALID_CONFIG,
                "network configuration has no name",
            ));
        }
        let plugin_type = string_key(&obj, "type", "")?;
        if plugin_type.is_empty() {
            return Err(CniError::new(
                INVALID_CONFIG,
                "network configuration has no type",
            ));
        }
        let exclude_namespaces = match obj.get("exclude_namespaces") {
            None | Some(Value::Null) => vec!["kube-system".to_owned()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        CniError::new(INVALID_CONFIG, "exclude_namespaces must be strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(CniError::new(
                    INVALID_CONFIG,
                    "exclude_namespaces must be an array of strings",
                ))
            }
        };
        let timeout_ms = match obj.get("timeout_ms") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT_MS,
            Some(v) => match v.as_u64() {
                Some(ms) if (1..=300_000).contains(&ms) => ms,
                _ => {
                    return Err(CniError::new(
                        INVALID_CONFIG,
                        format!("timeout_ms must be an integer from 1 to 300000, got {v}"),
                    ))
                }
            },
        };
        let decisions_max_age_s = match obj.get("decisions_max_age_s") {
            None | Some(Value::Null) => DEFAULT_DECISIONS_MAX_AGE_S,
            Some(v) => match v.as_u64() {
                Some(s) if s <= MAX_DECISIONS_MAX_AGE_S => s,
                _ => {
                    return Err(CniError::new(
                        INVALID_CONFIG,
                        format!(
                            "decisions_max_age_s must be an integer from 0 to {MAX_DECISIONS_MAX_AGE_S}, got {v}"
                        ),
                    ))
                }
            },
        };
        let level = string_key(&obj, "log_level", "info")?;
        let log_level = LogLevel::parse(&level)
            .ok_or_else(|| CniError::new(INVALID_CONFIG, format!("unknown log_level {level:?}")))?;
        let agent_socket = string_key(&obj, "agent_socket", DEFAULT_AGENT_SOCKET)?;
        if agent_socket.is_empty() {
            return Err(CniError::new(INVALID_CONFIG, "agent_socket is empty"));
        }
        Ok(Self {
            version,
            name,
            plugin_type,
            prev_result: obj.get("prevResult").filter(|v| !v.is_null()).cloned(),
            agent_socket,
            exclude_namespaces,
            timeout_ms,
            log_level,
            status_requires_agent: bool_key(&obj, "status_requires_agent", false)?,
            decisions_max_age_s,
            raw: obj,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambient-cni"}"#).unwrap();
        assert_eq!(c.agent_socket, DEFAULT_AGENT_SOCKET);
        assert_eq!(c.exclude_namespaces, vec!["kube-system"]);
        assert_eq!(c.timeout_ms, 5000);
        assert!(!c.status_requires_agent);
        assert_eq!(c.decisions_max_age_s, 600);
        assert_eq!(c.log_level, LogLevel::Info);
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let c = parse(
            r#"{"cniVersion":"0.3.1","name":"n","type":"ambient-cni","cni_agent_run_dir":"/x","ambient_enabled":true}"#,
        )
        .unwrap();
        assert_eq!(c.name, "n");
    }

    #[test]
    fn keys_of_older_installers_are_accepted_and_ignored() {
        // `agent_namespace`/`agent_pod_prefix` were written by installers before issue 15.
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","agent_namespace":"istio-system","agent_pod_prefix":"ambient-cni-node-"}"#,
        )
        .unwrap();
        assert!(!c.raw.is_empty());
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","agent_namespace":7,"agent_pod_prefix":null}"#,
        )
        .unwrap();
        assert_eq!(c.name, "n");
    }

    #[test]
    fn status_and_fallback_keys() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"ambient-cni","status_requires_agent":true,"decisions_max_age_s":0}"#,
        )
        .unwrap();
        assert!(c.status_requires_agent);
        assert_eq!(c.decisions_max_age_s, 0);
    }

    #[test]
    fn bad_inputs_get_the_right_codes() {
        let cases = [
            ("", 6),
            ("   \n", 6),
            ("not json", 6),
            ("[1,2]", 6),
            (r#"{"cniVersion":"1.0.0","type":"x"}"#, 7),
            (r#"{"cniVersion":"1.0.0","name":"x"}"#, 7),
            (r#"{"cniVersion":"9.9.9","name":"x","type":"y"}"#, 1),
            (r#"{"name":"x","type":"y"}"#, 1),
            (r#"{"cniVersion":1,"name":"x","type":"y"}"#, 7),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","timeout_ms":0}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","timeout_ms":"5"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","exclude_namespaces":"a"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","log_level":"loud"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","agent_socket":""}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","status_requires_agent":"yes"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","decisions_max_age_s":-1}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"x","type":"y","decisions_max_age_s":86401}"#,
                7,
            ),
        ];
        for (input, code) in cases {
            assert_eq!(parse(input).unwrap_err().code, code, "{input:?}");
        }
    }

    #[test]
    fn oversized_input_is_refused_without_parsing() {
        let big = vec![b'x'; MAX_STDIN + 1];
        assert_eq!(NetConf::parse(&big).unwrap_err().code, 6);
    }
}
