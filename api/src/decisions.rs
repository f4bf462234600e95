//! The agent's decisions file: which pods the agent knows are outside the mesh.
//!
//! The agent rewrites it (atomically) beside its plugin socket; the plugin reads it only
//! when the agent does not answer, so a non-mesh pod can still start while the agent is
//! down. Everything not listed fails closed. The plugin appends one byte per fallback to
//! [`FALLBACKS_FILE`] (same directory), which the agent counts on scrape.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version this release writes and reads.
pub const VERSION: u32 = 1;
/// The decisions file's name, in the agent socket's directory.
pub const FILE_NAME: &str = "decisions.json";
/// The fallback counter file's name, in the agent socket's directory.
pub const FALLBACKS_FILE: &str = "plugin-fallbacks";
/// Largest decisions file the plugin reads (it refuses, and fails closed, beyond).
pub const MAX_BYTES: usize = 2 << 20;
/// Most pods the agent lists (a node runs a few hundred at most).
pub const MAX_PODS: usize = 4096;
/// Most namespaces the agent lists.
pub const MAX_NAMESPACES: usize = 4096;
/// Longest pod name the agent lists (Kubernetes' DNS subdomain limit).
pub const MAX_NAME: usize = 253;
/// Longest namespace name the agent lists (Kubernetes' DNS label limit).
pub const MAX_NAMESPACE: usize = 63;
/// Longest pod uid the agent lists (Kubernetes' are 36).
pub const MAX_UID: usize = 64;
/// Largest fallback counter file; the plugin stops appending beyond (counts saturate).
pub const MAX_FALLBACKS_BYTES: u64 = 64 << 10;
/// Byte the plugin appends when a pod passed through on the decisions file.
pub const FALLBACK_PASS_THROUGH: u8 = b'p';
/// Byte the plugin appends when it failed closed with the agent unreachable.
pub const FALLBACK_FAIL_CLOSED: u8 = b'f';

/// One pod, as the kubelet names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodKey {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`.
    pub uid: String,
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decisions {
    /// [`VERSION`].
    pub version: u32,
    /// When the agent wrote it (seconds since the Unix epoch).
    pub written_at: u64,
    /// Namespaces none of whose pods can be in the mesh, whatever their labels.
    pub namespaces: Vec<String>,
    /// Pods the agent has seen and decided are not in the mesh.
    pub pods: Vec<PodKey>,
}

/// The decisions file beside the agent socket `socket`.
pub fn file_beside(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(FILE_NAME)
}

/// The fallback counter file beside the agent socket `socket`.
pub fn fallbacks_beside(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(FALLBACKS_FILE)
}

/// Whether the agent may list `s` in a field limited to `max` bytes: Kubernetes name
/// characters only, so no JSON escaping grows the file beyond [`MAX_BYTES`].
pub fn listable(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Decisions {
    /// Parses and checks a file's bytes: size, JSON shape, version and bounds.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!(
                "{} bytes, more than the {MAX_BYTES} allowed",
                bytes.len()
            ));
        }
        // The version first, so a newer format is named as such rather than as corrupt.
        #[derive(Deserialize)]
        struct Versioned {
            version: Option<u32>,
        }
        let v: Versioned =
            serde_json::from_slice(bytes).map_err(|e| format!("not a decisions file: {e}"))?;
        match v.version {
            Some(VERSION) => {}
            Some(other) => return Err(format!("version {other}, this plugin reads {VERSION}")),
            None => return Err("no version".into()),
        }
        let d: Self =
            serde_json::from_slice(bytes).map_err(|e| format!("not a decisions file: {e}"))?;
        if d.pods.len() > MAX_PODS || d.namespaces.len() > MAX_NAMESPACES {
            return Err(format!(
                "{} pods and {} namespaces, more than allowed",
                d.pods.len(),
                d.namespaces.len()
            ));
        }
        Ok(d)
    }

    /// The JSON the agent writes.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings and integers always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Decisions {
        Decisions {
            version: VERSION,
            written_at: 1_700_000_000,
            namespaces: vec!["kube-system".into()],
            pods: vec![PodKey {
                namespace: "plain".into(),
                name: "web".into(),
                uid: "u1".into(),
            }],
        }
    }

    #[test]
    fn round_trips() {
        let d = sample();
        assert_eq!(Decisions::parse(&d.to_json()).unwrap(), d);
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        let good = String::from_utf8(sample().to_json()).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated", good.as_bytes()[..good.len() / 2].to_vec()),
            ("not JSON", b"\x00\xffgarbage".to_vec()),
            ("array", b"[1,2]".to_vec()),
            (
                "no version",
                good.replace("\"version\":1,", "").into_bytes(),
            ),
            (
                "newer version",
                good.replace("\"version\":1", "\"version\":2").into_bytes(),
            ),
            (
                "version as string",
                good.replace("\"version\":1", "\"version\":\"1\"")
                    .into_bytes(),
            ),
            (
                "no written_at",
                good.replace("\"written_at\":1700000000,", "").into_bytes(),
            ),
            (
                "negative time",
                good.replace("1700000000", "-1").into_bytes(),
            ),
            (
                "pods not a list",
                good.replace("\"pods\":[", "\"pods\":{\"x\":[").into_bytes(),
            ),
            (
                "unknown key",
                good.replace("{\"version\"", "{\"all_plain\":true,\"version\"")
                    .into_bytes(),
            ),
            ("oversized", vec![b' '; MAX_BYTES + 1]),
        ];
        for (what, bytes) in cases {
            assert!(Decisions::parse(&bytes).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn the_largest_file_the_agent_can_write_fits_the_limit() {
        let ns = "n".repeat(MAX_NAMESPACE);
        let d = Decisions {
            version: VERSION,
            written_at: u64::MAX,
            namespaces: vec![ns.clone(); MAX_NAMESPACES],
            pods: vec![
                PodKey {
                    namespace: ns.clone(),
                    name: "p".repeat(MAX_NAME),
                    uid: "u".repeat(MAX_UID),
                };
                MAX_PODS
            ],
        };
        assert!(listable(&ns, MAX_NAMESPACE) && !listable(&ns, MAX_NAMESPACE - 1));
        assert!(!listable("a\"b", MAX_NAME) && !listable("", MAX_NAME));
        let bytes = d.to_json();
        assert!(bytes.len() <= MAX_BYTES, "{}", bytes.len());
        assert_eq!(Decisions::parse(&bytes).unwrap(), d);
    }

    #[test]
    fn files_live_beside_the_socket() {
        let s = Path::new("/var/run/ambient-cni/plugin.sock");
        assert_eq!(
            file_beside(s),
            Path::new("/var/run/ambient-cni/decisions.json")
        );
        assert_eq!(
            fallbacks_beside(s),
            Path::new("/var/run/ambient-cni/plugin-fallbacks")
        );
    }
}
