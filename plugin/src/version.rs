//! CNI spec versions we accept, and the VERSION command's answer.

use crate::error::{CniError, INCOMPATIBLE_VERSION};

/// The spec version this plugin implements.
pub const IMPLEMENTED: &str = "1.1.0";
/// Conf versions accepted (0.3.0 to 1.1.0).
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A supported spec version, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecVersion {
    /// 0.3.0
    V030,
    /// 0.3.1
    V031,
    /// 0.4.0
    V040,
    /// 1.0.0
    V100,
    /// 1.1.0
    V110,
}

impl SpecVersion {
    /// Parses a `cniVersion` string, refusing what we do not support.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "0.3.0" => Self::V030,
            "0.3.1" => Self::V031,
            "0.4.0" => Self::V040,
            "1.0.0" => Self::V100,
            "1.1.0" => Self::V110,
            _ => {
                return Err(CniError::new(
                    INCOMPATIBLE_VERSION,
                    format!("unsupported cniVersion {s:?}"),
                )
                .with_details(format!("supported: {}", SUPPORTED.join(", "))))
            }
        })
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V030 => "0.3.0",
            Self::V031 => "0.3.1",
            Self::V040 => "0.4.0",
            Self::V100 => "1.0.0",
            Self::V110 => "1.1.0",
        }
    }

    /// Whether results of this version use the 0.3.x/0.4.0 format (`ips[].version`).
    pub fn is_legacy_result(self) -> bool {
        self < Self::V100
    }
}

/// The VERSION command's output.
pub fn version_info() -> String {
    serde_json::json!({
        "cniVersion": IMPLEMENTED,
        "supportedVersions": SUPPORTED,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_orders_them() {
        let parsed: Vec<_> = SUPPORTED
            .iter()
            .map(|s| SpecVersion::parse(s).unwrap())
            .collect();
        assert!(parsed.windows(2).all(|w| w[0] < w[1]));
        for (s, v) in SUPPORTED.iter().zip(parsed) {
            assert_eq!(v.as_str(), *s);
        }
    }

    #[test]
    fn refuses_unknown_versions_with_code_1() {
        for bad in ["0.1.0", "0.2.0", "2.0.0", "", "1.1"] {
            assert_eq!(SpecVersion::parse(bad).unwrap_err().code, 1, "{bad}");
        }
    }

    #[test]
    fn version_info_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_info()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
