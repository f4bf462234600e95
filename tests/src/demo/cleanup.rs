//! Everything the demo made, and its removal in order (best effort, every step
//! reported), also on Ctrl-C, on errors and on a panic.

use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use super::table::Table;
use super::traffic::PeerListener;
use crate::cni::{Attachment, Chain};
use crate::{try_ip, NamedNetns};

/// `net.ipv4.ip_forward`: the bridge plugin turns it on for its gateway.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Everything the demo made, so it can all be removed.
#[derive(Default)]
pub struct Env {
    /// The demo's directory (pod source, CNI dirs, sockets, logs).
    pub tmp: Option<PathBuf>,
    /// The peer's and the pods' netns, in creation order.
    pub netns: Vec<NamedNetns>,
    /// The bridge the bridge plugin creates.
    pub bridge: Option<String>,
    /// Host ends of the veths (they die with their netns; checked anyway).
    pub veths: Vec<String>,
    /// Every successful ADD, with its result, for the DEL.
    pub attached: Vec<(Chain, Attachment, Option<Value>)>,
    /// The agent process.
    pub agent: Option<Child>,
    /// The ztunnel stand-in process.
    pub standin: Option<Child>,
    /// The peer's listener.
    pub peer: Option<PeerListener>,
    /// `ip_forward` as it was before the demo.
    pub ip_forward: Option<String>,
    /// Cleaned up (or kept on purpose): nothing left to do.
    pub done: bool,
}

/// SIGTERM, then SIGKILL after `grace`; says which it took.
fn stop_child(child: &mut Child, grace: Duration) -> String {
    if let Ok(Some(st)) = child.try_wait() {
        return format!("had exited ({st})");
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return "stopped (SIGTERM)".into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    "killed (SIGKILL after SIGTERM)".into()
}

/// Deletes host link `name` unless it is already gone.
fn delete_link(name: &str, absent: &str) -> Result<String> {
    if try_ip(&["link", "show", "dev", name]).is_err() {
        return Ok(absent.to_owned());
    }
    try_ip(&["link", "delete", name])
        .map(|_| "deleted".to_owned())
        .map_err(anyhow::Error::msg)
}

impl Env {
    /// True while the demo has made nothing that needs removing.
    pub fn is_empty(&self) -> bool {
        self.tmp.is_none()
            && self.netns.is_empty()
            && self.bridge.is_none()
            && self.attached.is_empty()
            && self.agent.is_none()
            && self.standin.is_none()
            && self.peer.is_none()
    }

    /// Removes everything; returns the failures (the table shows every step).
    pub fn cleanup(&mut self) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut t = Table::new(&["WHAT", "RESULT"]);
        let mut failures = Vec::new();
        let mut note = |t: &mut Table, what: String, r: Result<String>| match r {
            Ok(s) => t.row(vec![what, s]),
            Err(e) => {
                t.row(vec![what.clone(), format!("FAILED: {e:#}")]);
                failures.push(format!("{what}: {e:#}"));
            }
        };
        if let Some(mut p) = self.peer.take() {
            p.stop();
            note(&mut t, "peer listener".into(), Ok("closed".into()));
        }
        // DEL while the agent runs, so it releases the pods as a runtime's DEL would.
        for (chain, att, cached) in self.attached.drain(..).rev() {
            let r = chain.del(&att, cached.as_ref()).map(|()| "ok".to_owned());
            let r = r.map_err(|(i, out)| {
                let e = super::chain::ChainError::from_exec(&chain, i, &out);
                anyhow::anyhow!("{e}")
            });
            note(&mut t, format!("CNI DEL {}", att.container_id), r);
        }
        if let Some(mut c) = self.standin.take() {
            let r = stop_child(&mut c, Duration::from_secs(2));
            note(&mut t, format!("ztunnel stand-in (pid {})", c.id()), Ok(r));
        }
        if let Some(mut c) = self.agent.take() {
            let r = stop_child(&mut c, Duration::from_secs(5));
            note(&mut t, format!("agent (pid {})", c.id()), Ok(r));
        }
        for ns in self.netns.drain(..).rev() {
            let what = format!("netns {}", ns.name());
            let r = ns.delete().map(|()| "deleted".to_owned());
            note(&mut t, what, r.map_err(anyhow::Error::msg));
        }
        // The veths die with their netns; deleting a leftover one covers a DEL that failed.
        for v in self.veths.drain(..) {
            note(&mut t, format!("link {v}"), delete_link(&v, "gone"));
        }
        if let Some(b) = self.bridge.take() {
            note(
                &mut t,
                format!("link {b} (bridge)"),
                delete_link(&b, "not created"),
            );
        }
        if let Some(old) = self.ip_forward.take() {
            let now = fs::read_to_string(IP_FORWARD).unwrap_or_default();
            let r = if now.trim() == old.trim() {
                Ok(format!("unchanged ({})", old.trim()))
            } else {
                fs::write(IP_FORWARD, &old)
                    .map(|()| format!("restored to {}", old.trim()))
                    .with_context(|| format!("write {IP_FORWARD}"))
            };
            note(&mut t, "net.ipv4.ip_forward".into(), r);
        }
        if let Some(d) = self.tmp.take() {
            let r = fs::remove_dir_all(&d)
                .map(|()| "removed".to_owned())
                .with_context(|| format!("remove {}", d.display()));
            note(&mut t, format!("dir {}", d.display()), r);
        }
        t.print();
        failures
    }

    /// With `--keep`: leaves everything in place and prints how to remove it.
    pub fn keep(&mut self) {
        self.done = true;
        println!("\nLeft running (--keep). To remove it all:");
        for c in [self.standin.take(), self.agent.take()]
            .into_iter()
            .flatten()
        {
            // Dropping a Child neither kills nor reaps it: it keeps running.
            println!("  kill {}", c.id());
        }
        for ns in self.netns.drain(..) {
            println!("  ip netns delete {}", ns.keep());
        }
        if let Some(b) = &self.bridge {
            println!("  ip link delete {b}");
        }
        if let Some(d) = &self.tmp {
            println!("  rm -rf {}", d.display());
        }
        // The peer listener lives in this process and ends with it.
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A panic unwinding through the steps still removes what was made.
        if !self.done {
            let _ = self.cleanup();
        }
    }
}
