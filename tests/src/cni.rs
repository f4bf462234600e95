//! A conflist executed the way libcni does it, with real plugin binaries.
//!
//! ADD runs the plugins in order, each getting the list's `name`/`cniVersion`
//! and the previous plugin's result as `prevResult`; DEL runs them in reverse
//! with the cached ADD result (from 0.4.0 on); CHECK runs them in order with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{exec_plugin, Exec, DEBIAN_CNI_DIR};

/// The container a chain is run for.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl Attachment {
    /// A kubelet-style attachment for pod `ns/name` in `netns`.
    pub fn pod(netns: &str, ns: &str, name: &str, uid: &str) -> Self {
        Self {
            container_id: format!("ctr-{name}-{uid}"),
            netns: netns.to_owned(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=ctr-{name};K8S_POD_UID={uid}"
            ),
        }
    }
}

/// A conflist plus where its plugin binaries are.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The conflist JSON.
    pub conflist: Value,
    /// Directories searched for plugin binaries (also passed as `CNI_PATH`).
    pub path: Vec<PathBuf>,
    /// Per-exec time limit.
    pub limit: Duration,
    /// Plugin types that speak at most a version (Debian 12's plugins stop at 1.0.0):
    /// they are run at that version and their result relabelled, since the 1.0.0 and
    /// 1.1.0 result formats are identical.
    pub max_version: Vec<(String, String)>,
}

impl Chain {
    /// Debian's bridge + host-local, then our plugin entry, at `version`.
    ///
    /// The bridge is `bridge` in the host netns with `subnet`; host-local keeps its
    /// state in `ipam_dir` so tests never touch /var/lib/cni.
    pub fn bridge_then(
        version: &str,
        bridge: &str,
        subnet: &str,
        ipam_dir: &Path,
        entry: Value,
    ) -> Self {
        let conflist = json!({
            "cniVersion": version,
            "name": "acni-test",
            "plugins": [
                bridge_plugin(bridge, subnet, ipam_dir),
                entry,
            ],
        });
        let plugin_dir = crate::plugin_bin()
            .parent()
            .map(Path::to_owned)
            .unwrap_or_default();
        Self {
            conflist,
            path: vec![PathBuf::from(DEBIAN_CNI_DIR), plugin_dir],
            limit: Duration::from_secs(20),
            max_version: vec![("bridge".into(), "1.0.0".into())],
        }
    }

    fn version(&self) -> String {
        self.conflist["cniVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn find(&self, ty: &str) -> Option<PathBuf> {
        self.path.iter().map(|d| d.join(ty)).find(|p| p.exists())
    }

    /// The conf one plugin receives on stdin.
    pub fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        let version = self.plugin_version(plugin);
        if let Some(p) = prev {
            let mut p = p.clone();
            p["cniVersion"] = version.clone().into();
            conf["prevResult"] = p;
        }
        conf["cniVersion"] = version.into();
        conf
    }

    /// The version a plugin is run at (the list's, capped by `max_version`).
    fn plugin_version(&self, plugin: &Value) -> String {
        let list = self.version();
        let ty = plugin["type"].as_str().unwrap_or_default();
        match self.max_version.iter().find(|(t, _)| t == ty) {
            Some((_, max)) if list == "1.1.0" => max.clone(),
            _ => list,
        }
    }

    /// Execs one plugin for `cmd`; a plugin not found in `path` is an exec with
    /// code -1 and the reason on stderr, as a runtime reports it.
    pub fn exec_one(
        &self,
        cmd: &str,
        plugin: &Value,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Exec {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let conf = self.plugin_conf(plugin, prev);
        let cni_path = self
            .path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let env = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", att.container_id.as_str()),
            ("CNI_NETNS", att.netns.as_str()),
            ("CNI_IFNAME", att.ifname.as_str()),
            ("CNI_ARGS", att.args.as_str()),
            ("CNI_PATH", cni_path.as_str()),
        ];
        let Some(bin) = self.find(ty) else {
            return not_run(format!("CNI plugin {ty:?} not found in {:?}", self.path));
        };
        exec_plugin(&bin, &env, conf.to_string().as_bytes(), self.limit)
    }

    /// ADD through the whole list; returns every plugin's result in order, or the
    /// failing exec (a non-zero exit, or a result that is not JSON).
    pub fn add(&self, att: &Attachment) -> Result<Vec<Value>, (usize, Exec)> {
        let mut results: Vec<Value> = Vec::new();
        for (i, plugin) in self.plugins().iter().enumerate() {
            let out = self.exec_one("ADD", plugin, att, results.last());
            let parsed = serde_json::from_str::<Value>(&out.stdout);
            let mut result = match parsed {
                Ok(v) if out.code == 0 => v,
                _ => return Err((i, out)),
            };
            // A capped plugin's result is relabelled to the list's version (same format).
            result["cniVersion"] = self.conflist["cniVersion"].clone();
            results.push(result);
        }
        Ok(results)
    }

    /// DEL through the list in reverse; `cached` is the ADD's final result.
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<(), (usize, Exec)> {
        let legacy = self.version().starts_with("0.3");
        let prev = if legacy { None } else { cached };
        for (i, plugin) in self.plugins().iter().enumerate().rev() {
            let out = self.exec_one("DEL", plugin, att, prev);
            if out.code != 0 {
                return Err((i, out));
            }
        }
        Ok(())
    }

    /// CHECK through the list with the cached result.
    pub fn check(&self, att: &Attachment, cached: &Value) -> Result<(), (usize, Exec)> {
        for (i, plugin) in self.plugins().iter().enumerate() {
            let out = self.exec_one("CHECK", plugin, att, Some(cached));
            if out.code != 0 {
                return Err((i, out));
            }
        }
        Ok(())
    }
}

/// An exec that never ran: code -1, `why` on stderr.
fn not_run(why: String) -> Exec {
    Exec {
        stdout: String::new(),
        stderr: why,
        code: -1,
        elapsed: Duration::ZERO,
    }
}

/// Debian's `bridge` plugin on `bridge` (gateway, no masquerade) with `host-local` IPAM on
/// `subnet`, its state in `ipam_dir`: the primary CNI of every test chain.
pub fn bridge_plugin(bridge: &str, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": ipam_dir},
    })
}
