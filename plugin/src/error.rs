//! CNI errors: the spec's error JSON and its codes.

use serde::Serialize;

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Invalid or missing environment variables.
pub const INVALID_ENV: u32 = 4;
/// The input could not be decoded.
pub const DECODE: u32 = 6;
/// The network configuration is invalid.
pub const INVALID_CONFIG: u32 = 7;
/// Try again later (agent unreachable, busy or too slow).
pub const TRY_AGAIN_LATER: u32 = 11;
/// STATUS: the plugin cannot serve ADDs now.
pub const NOT_AVAILABLE: u32 = 50;
/// Ours: the agent refused to capture the pod (e.g. ztunnel nacked it).
pub const AGENT_REFUSED: u32 = 100;
/// Ours: the agent answered something that is not the protocol.
pub const AGENT_PROTOCOL: u32 = 101;
/// Ours: CHECK found a captured pod whose redirection is missing.
pub const REDIRECTION_MISSING: u32 = 102;

/// A CNI error as printed on stdout (`cniVersion` is filled in when printing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The spec's error code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details (may be empty).
    pub details: String,
}

impl CniError {
    /// An error with a code and message, no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error JSON for a given `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(
                r#"{{"cniVersion":"{cni_version}","code":{},"msg":"error"}}"#,
                self.code
            )
        })
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_spec_fields() {
        let e = CniError::new(7, "bad \"conf\"").with_details("line 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad \"conf\"");
        assert_eq!(v["details"], "line 1");
    }

    #[test]
    fn empty_details_are_omitted() {
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(11, "later").to_json("1.1.0")).unwrap();
        assert!(v.get("details").is_none());
    }
}
