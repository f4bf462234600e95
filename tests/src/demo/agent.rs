//! Step 2 and the agent's side of the later steps: the real `ambient-cni-agent run`
//! (local pod source, its installer chaining the plugin into the demo's primary
//! CNI config) and the ztunnel stand-in as child processes, and what the demo asks
//! the running agent through its operator interfaces: `/readyz`, `/metrics` and
//! `ambient-cni-agent status --json` (the admin socket).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use super::cleanup::Env;
use super::interrupt::wait_until;
use super::pods::{pod_json, write_json, Pod};
use super::prereq::{executable, Prereqs};
use super::table::Table;
use super::{chain, DemoArgs, CHILD_PATH, CNI_VERSION, NAMESPACE};
use crate::cni::{bridge_plugin, Chain};
use crate::{expo, http, standin_events, DEBIAN_CNI_DIR};

/// How the demo reaches the running agent.
pub struct Agent {
    /// The agent binary (its `status` subcommand is the admin socket's client).
    pub bin: PathBuf,
    /// The agent's run dir (its admin socket is there).
    pub run_dir: PathBuf,
    /// The health port.
    pub health: SocketAddr,
    /// The metrics port.
    pub metrics: SocketAddr,
}

/// One pod as `ambient-cni-agent status --json` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct HeldPod {
    /// The pod's UID.
    pub uid: String,
    /// `pending` or `enabled`.
    pub phase: String,
    /// The agent's own check of the pod's rules against what it applied.
    pub rules_ok: bool,
    /// ztunnel acknowledged the pod.
    pub ztunnel_acked: bool,
}

/// What `ambient-cni-agent status --json` reports.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// The rules backend the agent runs.
    pub backend: String,
    /// The pods it holds.
    pub pods: Vec<HeldPod>,
}

impl Status {
    /// Parses the JSON `status --json` prints.
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("ambient-cni-agent status --json: unexpected output")
    }

    /// The pod with `uid`, if the agent holds it.
    pub fn pod(&self, uid: &str) -> Option<&HeldPod> {
        self.pods.iter().find(|p| p.uid == uid)
    }

    /// True if the agent holds `uid` captured: enabled, rules complete, ztunnel acked.
    pub fn captured(&self, uid: &str) -> bool {
        self.pod(uid)
            .is_some_and(|p| p.phase == "enabled" && p.rules_ok && p.ztunnel_acked)
    }
}

impl Agent {
    /// Asks the running agent what it holds (`status --json` over its admin socket).
    pub fn status(&self) -> Result<Status> {
        let out = Command::new(&self.bin)
            .arg("status")
            .arg("--json")
            .arg("--run-dir")
            .arg(&self.run_dir)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {} status", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} status --run-dir {}: {}",
                self.bin.display(),
                self.run_dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Status::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Prints the agent's headline metrics (scraped from its metrics port).
    pub fn show_metrics(&self) -> Result<()> {
        let addr = self.metrics;
        let (code, body) = http::get(addr, "/metrics", Duration::from_secs(3))?;
        if code != 200 {
            bail!("GET http://{addr}/metrics: status {code}");
        }
        let e = expo::parse(&body).with_context(|| format!("http://{addr}/metrics"))?;
        let mut t = Table::new(&["METRIC", "VALUE"]);
        let rows: [(&str, &[(&str, &str)]); 8] = [
            (
                "ambient_cni_plugin_requests_total",
                &[("command", "ADD"), ("result", "captured")],
            ),
            (
                "istio_cni_plugin_requests_total",
                &[("response_code", "200")],
            ),
            ("ambient_cni_enrolments_total", &[("result", "enabled")]),
            ("ambient_cni_pods", &[("state", "enabled")]),
            ("ambient_cni_pods", &[("state", "pending")]),
            ("ambient_cni_pods", &[("state", "failed")]),
            ("ztunnel_connected", &[]),
            ("ambient_cni_plugin_add_duration_seconds_count", &[]),
        ];
        for (name, labels) in rows {
            let shown = if labels.is_empty() {
                name.to_owned()
            } else {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{name}{{{}}}", l.join(","))
            };
            let v = e
                .value(name, labels)
                .map_or_else(|| "-".into(), |v| v.to_string());
            t.row(vec![shown, v]);
        }
        t.print();
        Ok(())
    }
}

/// What the started agent offers the later steps.
pub struct Started {
    /// The conflist as the installer left it, with `CNI_PATH`.
    pub chain: Chain,
    /// The conflist file.
    pub conflist: PathBuf,
    /// The running agent.
    pub agent: Agent,
    /// The stand-in's event file.
    pub events: PathBuf,
}

/// A free loopback port (bound then released; the agent binds it a moment later).
fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?)
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes the pod source and the primary CNI config, starts the agent and the stand-in,
/// and waits until the plugin is chained in, the stand-in holds the snapshot and the
/// agent is ready.
pub fn start(
    args: &DemoArgs,
    pre: &Prereqs,
    env: &mut Env,
    tmp: &Path,
    pods: &[Pod],
) -> Result<Started> {
    let pods_dir = tmp.join("pods");
    fs::create_dir_all(pods_dir.join("pods")).context("create the pod source dir")?;
    fs::create_dir_all(pods_dir.join("namespaces")).context("create the pod source dir")?;
    write_json(
        &pods_dir
            .join("namespaces")
            .join(format!("{NAMESPACE}.json")),
        &json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}}
        }),
    )?;
    for p in pods {
        write_json(&p.file(&pods_dir), &pod_json(&p.name, &p.uid, None))?;
    }
    // The "primary CNI" of this host: a bridge with host-local IPAM. The agent's
    // installer chains ambient-cni into it, as it does on a node.
    let (bin_dir, conf_dir) = (tmp.join("cni-bin"), tmp.join("net.d"));
    fs::create_dir_all(&bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    fs::create_dir_all(&conf_dir).with_context(|| format!("create {}", conf_dir.display()))?;
    let bridge = format!("acnidemo{:x}", std::process::id() & 0xffff);
    env.bridge = Some(bridge.clone());
    let conflist = conf_dir.join("10-demo.conflist");
    write_json(
        &conflist,
        &json!({
            "cniVersion": CNI_VERSION,
            "name": "demo-net",
            "plugins": [bridge_plugin(&bridge, &args.subnet, &tmp.join("ipam"))]
        }),
    )?;
    let plugin_sock = tmp.join("plugin.sock");
    let zds_sock = tmp.join("ztunnel.sock");
    let agent_log = tmp.join("agent.log");
    let agent = Agent {
        bin: pre.agent.clone(),
        run_dir: tmp.join("run"),
        health: free_port()?,
        metrics: free_port()?,
    };
    // The README's "try it by hand": `run` with the local pod source.
    let mut agent_args: Vec<String> = vec!["run".into()];
    for (flag, value) in [
        ("--node-name", "demo-node".to_owned()),
        ("--pod-source", "local".into()),
        ("--local-pods-dir", pods_dir.display().to_string()),
        ("--agent-socket", plugin_sock.display().to_string()),
        ("--ztunnel-uds-address", zds_sock.display().to_string()),
        ("--run-dir", agent.run_dir.display().to_string()),
        ("--host-proc", "/proc".into()),
        ("--rules-backend", pre.redirector.kind().as_str().into()),
        ("--cni-bin-dir", bin_dir.display().to_string()),
        ("--cni-conf-dir", conf_dir.display().to_string()),
        ("--plugin-binary", pre.plugin.display().to_string()),
        ("--health-addr", agent.health.to_string()),
        ("--metrics-addr", agent.metrics.to_string()),
        ("--log-format", "text".into()),
    ] {
        agent_args.push(flag.into());
        agent_args.push(value);
    }
    let log =
        fs::File::create(&agent_log).with_context(|| format!("create {}", agent_log.display()))?;
    let child = Command::new(&agent.bin)
        .args(&agent_args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: Ctrl-C reaches the demo only, which then cleans up in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the agent {}", agent.bin.display()))?;
    let agent_pid = child.id();
    env.agent = Some(child);
    let events = tmp.join("standin.jsonl");
    let standin = Command::new(&pre.standin)
        .arg("--socket")
        .arg(&zds_sock)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&events).context("create the stand-in's event file")?)
        .stderr(fs::File::create(tmp.join("standin.log")).context("create the stand-in's log")?)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start the stand-in {}", pre.standin.display()))?;
    let standin_pid = standin.id();
    env.standin = Some(standin);
    let agent_alive = |env: &mut Env| -> Result<()> {
        if let Some(Ok(Some(st))) = env.agent.as_mut().map(|c| c.try_wait()) {
            bail!(
                "the agent exited ({st}); its log:\n{}",
                tail(&agent_log, 20)
            );
        }
        Ok(())
    };
    wait_until(Duration::from_secs(20), "the agent's plugin socket", || {
        agent_alive(env)?;
        Ok(plugin_sock.exists())
    })?;
    let path = vec![bin_dir.clone(), PathBuf::from(DEBIAN_CNI_DIR)];
    wait_until(
        Duration::from_secs(20),
        "the installer to chain ambient-cni in",
        || {
            agent_alive(env)?;
            Ok(chain::load(&conflist, path.clone())
                .is_ok_and(|c| chain::types(&c).iter().any(|t| t == "ambient-cni"))
                && executable(&bin_dir.join("ambient-cni")))
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the agent's ZDS socket (state rebuilt)",
        || {
            agent_alive(env)?;
            Ok(zds_sock.exists())
        },
    )?;
    wait_until(
        Duration::from_secs(20),
        "the stand-in to connect and get its snapshot",
        || {
            Ok(standin_events(&events)
                .iter()
                .any(|e| e["event"] == "snapshot_sent"))
        },
    )?;
    let health = agent.health;
    let mut last = String::new();
    wait_until(Duration::from_secs(20), "the agent's /readyz", || {
        agent_alive(env)?;
        Ok(match http::get(health, "/readyz", Duration::from_secs(1)) {
            Ok((200, _)) => true,
            Ok((code, body)) => {
                last = format!("{code} {}", body.trim());
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        })
    })
    .with_context(|| format!("last answer: {last}"))?;
    let status = agent.status()?;
    let chain = chain::load(&conflist, path)?;
    let mut t = Table::new(&["PROCESS", "PID", "DETAIL"]);
    let rows = [
        (
            "agent",
            agent_pid.to_string(),
            format!("rules backend {}", status.backend),
        ),
        (
            "",
            String::new(),
            format!("pod source {}", pods_dir.display()),
        ),
        (
            "",
            String::new(),
            format!("plugin socket {}", plugin_sock.display()),
        ),
        (
            "",
            String::new(),
            format!("ZDS socket {}", zds_sock.display()),
        ),
        (
            "",
            String::new(),
            format!("installed {}", bin_dir.join("ambient-cni").display()),
        ),
        (
            "",
            String::new(),
            format!(
                "chained into {}: {}",
                conflist.display(),
                chain::describe(&chain)
            ),
        ),
        (
            "",
            String::new(),
            format!("readiness: 200 ready (http://{health}/readyz)"),
        ),
        (
            "ztunnel stand-in",
            standin_pid.to_string(),
            "connected over ZDS, snapshot received".into(),
        ),
    ];
    for (a, b, c) in rows {
        t.row(vec![a.into(), b, c]);
    }
    t.print();
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    println!(
        "  namespace {NAMESPACE} is labelled istio.io/dataplane-mode=ambient; its pods: {}",
        names.join(", ")
    );
    Ok(Started {
        chain,
        conflist,
        agent,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_status_json_prints() {
        // The shape `ambient-cni-agent status --json` prints (extra fields ignored).
        let text = r#"{"node": "demo-node", "backend": "nftables", "ready": true,
            "ztunnel_connections": 1, "pods": [
              {"namespace": "demo", "name": "web-0", "uid": "u0", "phase": "enabled",
               "netns": "/var/run/netns/x", "netns_inode": 1, "rules_ok": true,
               "rules_detail": "ok", "ztunnel_acked": true, "last_error": "",
               "ips": ["10.200.0.2"], "age_seconds": 3},
              {"namespace": "demo", "name": "web-1", "uid": "u1", "phase": "pending",
               "netns": "", "netns_inode": 0, "rules_ok": false, "rules_detail": "netns unknown",
               "ztunnel_acked": false, "last_error": "", "ips": [], "age_seconds": 0}]}"#;
        let s = Status::parse(text).unwrap();
        assert_eq!(s.backend, "nftables");
        assert!(s.captured("u0"));
        assert!(!s.captured("u1"));
        assert!(!s.captured("absent"));
        assert!(Status::parse("{}").is_err());
    }
}
