//! The node's CNI chain as the agent's installer left it, run through the test
//! crate's libcni-style [`Chain`], and its results and failures put into words.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cni::Chain;
use crate::Exec;

/// How long one plugin exec may take.
const EXEC_LIMIT: Duration = Duration::from_secs(20);

/// Loads a conflist file; plugin binaries are looked up in `path`, in order.
pub fn load(file: &Path, path: Vec<PathBuf>) -> Result<Chain> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let conflist: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    if !conflist["plugins"].is_array() {
        anyhow::bail!("{}: no plugins list", file.display());
    }
    Ok(Chain {
        conflist,
        path,
        limit: EXEC_LIMIT,
        // Debian 12's plugins speak up to 1.0.0 (used only if the list says 1.1.0).
        max_version: vec![("bridge".into(), "1.0.0".into())],
    })
}

/// The plugin types, in order.
pub fn types(chain: &Chain) -> Vec<String> {
    chain.conflist["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["type"].as_str().map(str::to_owned))
        .collect()
}

/// The chain for humans: `bridge (host-local IPAM) -> ambient-cni`.
pub fn describe(chain: &Chain) -> String {
    let parts: Vec<String> = chain.conflist["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ty = p["type"].as_str().unwrap_or("?");
            match p["ipam"]["type"].as_str() {
                Some(ipam) => format!("{ty} ({ipam} IPAM)"),
                None => ty.to_owned(),
            }
        })
        .collect();
    parts.join(" -> ")
}

/// A failed chain command: which plugin, its CNI error code, its message.
#[derive(Debug)]
pub struct ChainError {
    /// The failing plugin's type.
    pub plugin: String,
    /// The CNI error code it printed, if it printed one.
    pub code: Option<u64>,
    /// Its message (or exit status and stderr).
    pub msg: String,
}

impl ChainError {
    /// The failure of plugin number `index` of `chain`, from what it printed.
    pub fn from_exec(chain: &Chain, index: usize, out: &Exec) -> Self {
        let plugin = chain.conflist["plugins"][index]["type"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        let msg = match v["msg"].as_str() {
            Some(m) => m.to_owned(),
            None if out.code == 0 => format!("result is not JSON: {:?}", out.stdout),
            None => format!("exit {}; stderr: {}", out.code, out.stderr.trim()),
        };
        Self {
            plugin,
            code: v["code"].as_u64(),
            msg,
        }
    }
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(
                f,
                "plugin {} failed with code {c}: {}",
                self.plugin, self.msg
            ),
            None => write!(f, "plugin {} failed: {}", self.plugin, self.msg),
        }
    }
}

/// The first IPv4 address and the host-side interface of a CNI result.
pub fn ip_and_veth(result: &Value) -> (Option<Ipv4Addr>, Option<String>) {
    let ip = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .next();
    // The host end of the veth: in the host (no sandbox) and not the bridge itself.
    let veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && i["mac"].is_string())
        .filter_map(|i| i["name"].as_str())
        .find(|n| n.starts_with("veth"))
        .map(str::to_owned);
    (ip, veth)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chain() -> Chain {
        Chain {
            conflist: json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "bridge", "ipam": {"type": "host-local"}},
                {"type": "ambient-cni"}
            ]}),
            path: vec![],
            limit: EXEC_LIMIT,
            max_version: vec![],
        }
    }

    #[test]
    fn describes_the_chain() {
        let c = chain();
        assert_eq!(types(&c), ["bridge", "ambient-cni"]);
        assert_eq!(describe(&c), "bridge (host-local IPAM) -> ambient-cni");
    }

    #[test]
    fn a_failure_names_the_plugin_and_its_code() {
        let exec = |stdout: &str, code| Exec {
            stdout: stdout.into(),
            stderr: "boom".into(),
            code,
            elapsed: Duration::ZERO,
        };
        let e = ChainError::from_exec(
            &chain(),
            1,
            &exec(r#"{"cniVersion":"1.0.0","code":11,"msg":"try again"}"#, 1),
        );
        assert_eq!(
            (e.plugin.as_str(), e.code, e.to_string().as_str()),
            (
                "ambient-cni",
                Some(11),
                "plugin ambient-cni failed with code 11: try again"
            )
        );
        let e = ChainError::from_exec(&chain(), 0, &exec("", -1));
        assert_eq!(e.to_string(), "plugin bridge failed: exit -1; stderr: boom");
        let e = ChainError::from_exec(&chain(), 0, &exec("nope", 0));
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn reads_ip_and_host_veth_from_a_bridge_result() {
        let r = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "acnidemo1", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [{"interface": 2, "address": "10.200.0.3/24", "gateway": "10.200.0.1"}]
        });
        assert_eq!(
            ip_and_veth(&r),
            (
                Some(Ipv4Addr::new(10, 200, 0, 3)),
                Some("veth1234abcd".into())
            )
        );
    }
}
