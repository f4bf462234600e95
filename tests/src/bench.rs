//! What the end-to-end benches share: a captured-pod ADD exec'd like a runtime does.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::{exec_plugin, plugin_bin, plugin_entry, Exec, NamedNetns};

/// The `p`th percentile of `v`, in milliseconds.
pub fn pct(v: &[Duration], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1000.0
}

/// Rows showing what the exec harness ([`crate::exec_plugin`]) adds: `/bin/true` and
/// `sleep 0.001` timed by the same code, 200 times each. The second minus the first should be
/// 1 ms plus sleep's own start-up, never a polling quantum.
pub fn harness_rows() -> Vec<(String, f64, f64)> {
    let time = |bin: &str, args: &[&str]| {
        let mut v = Vec::with_capacity(200);
        for _ in 0..220 {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(args);
            let e = crate::exec_timed(cmd, b"", Duration::from_secs(5));
            assert_eq!(e.code, 0, "{bin} {args:?}: {}", e.stderr);
            v.push(e.elapsed);
        }
        v.drain(..20); // warm-up
        v
    };
    let t = time("/bin/true", &[]);
    let s = time("/bin/sleep", &["0.001"]);
    vec![
        ("/bin/true".into(), pct(&t, 50), pct(&t, 99)),
        ("sleep 0.001".into(), pct(&s, 50), pct(&s, 99)),
    ]
}

/// A path as the report shows it: relative to the workspace (the report names no machine's paths).
pub fn shown(p: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let p = p.canonicalize().unwrap_or_else(|_| p.to_owned());
    match p.strip_prefix(&root) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

/// The pod count a bench runs with: `var` when it parses, else `default`.
pub fn pods_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The plugin's conf for a bench ADD: quiet, 1.0.0, with a minimal prevResult.
pub fn plugin_conf(sock: &Path) -> String {
    let mut e = plugin_entry(sock, 5000);
    e["log_level"] = "error".into();
    e["cniVersion"] = "1.0.0".into();
    e["prevResult"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.97.0.5/24"}]});
    e.to_string()
}

/// One ADD of pod `mesh/name` (`uid`) in `netns` through the plugin binary.
pub fn add(conf: &str, netns: &NamedNetns, name: &str, uid: &str) -> Exec {
    let args =
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME={name};K8S_POD_UID={uid}");
    let path = netns.path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", uid),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
    ];
    exec_plugin(
        &plugin_bin(),
        &env,
        conf.as_bytes(),
        Duration::from_secs(10),
    )
}
