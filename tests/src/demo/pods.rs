//! The demo's pods: their Kubernetes objects in the local pod source, a netns each
//! with the CNI chain run into it as a runtime does, and what each pod's state is
//! (the agent's view beside what the demo sees in the netns and at the stand-in).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use iptables_rules::netns::{Netns, NsId};
use iptables_rules::{InpodConfig, Redirector};
use serde_json::{json, Value};

use super::agent::{Started, Status};
use super::chain::{self, ChainError};
use super::cleanup::{Env, IP_FORWARD};
use super::interrupt::checkpoint;
use super::table::Table;
use super::traffic::{listening_ports, PeerListener};
use super::{NAMESPACE, PEER_PORT};
use crate::cni::Attachment;
use crate::{standin_events, NamedNetns};

/// One demo pod.
pub struct Pod {
    /// Its name in [`NAMESPACE`].
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// Its netns name (`ip netns`).
    pub netns_name: String,
    /// Its netns, once made.
    pub netns: Option<Netns>,
    /// What the runtime passes the chain.
    pub att: Attachment,
    /// Its address, from the chain's result.
    pub ip: Option<Ipv4Addr>,
    /// The host end of its veth.
    pub veth: Option<String>,
    add_ms: u128,
    add_note: String,
}

impl Pod {
    /// Pod number `i` of the demo process `pid`.
    pub fn new(pid: u32, i: u8) -> Self {
        let name = format!("web-{i}");
        let uid = format!("demo-{pid}-{i}");
        let netns_name = format!("ambient-demo-{pid}-{name}");
        Self {
            att: Attachment::pod(
                &format!("/var/run/netns/{netns_name}"),
                NAMESPACE,
                &name,
                &uid,
            ),
            netns_name,
            name,
            uid,
            netns: None,
            ip: None,
            veth: None,
            add_ms: 0,
            add_note: String::new(),
        }
    }

    /// Its object's file in the local pod source `pods_dir`.
    pub fn file(&self, pods_dir: &Path) -> PathBuf {
        pods_dir.join("pods").join(format!("{}.json", self.name))
    }
}

/// The Pod object of `name` (labelled `istio.io/dataplane-mode=MODE` if given).
pub fn pod_json(name: &str, uid: &str, mode: Option<&str>) -> Value {
    let mut labels = json!({"app": "web"});
    if let Some(m) = mode {
        labels["istio.io/dataplane-mode"] = m.into();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid, "labels": labels},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "demo"}]},
        "status": {"phase": "Running"}
    })
}

/// Writes a JSON file atomically (the local pod source polls the directory).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Makes netns `name` (recorded in `env` for the cleanup) and opens it.
fn add_netns(env: &mut Env, name: &str, host: NsId) -> Result<Netns> {
    let ns = NamedNetns::create(name).map_err(anyhow::Error::msg)?;
    let path = PathBuf::from(ns.path());
    env.netns.push(ns);
    Ok(Netns::open(&path, Some(host))?)
}

/// Creates the peer and the pods (netns + CNI ADD through the installed chain, with
/// a runtime's retries); returns the peer's netns and address.
pub fn create(
    env: &mut Env,
    st: &Started,
    host: NsId,
    pid: u32,
    pods: &mut [Pod],
) -> Result<(Netns, SocketAddr)> {
    env.ip_forward = fs::read_to_string(IP_FORWARD).ok();
    // The peer: no Kubernetes pod name, so the plugin passes it through without asking.
    let peer_name = format!("ambient-demo-{pid}-peer");
    let peer_ns = add_netns(env, &peer_name, host)?;
    let peer_att = Attachment {
        container_id: format!("demo-{pid}-peer"),
        netns: format!("/var/run/netns/{peer_name}"),
        ifname: "eth0".into(),
        args: "IgnoreUnknown=1".into(),
    };
    let peer_result = final_result(st.chain.add(&peer_att).map_err(|(i, out)| {
        let e = ChainError::from_exec(&st.chain, i, &out);
        anyhow!(
            "peer (netns {peer_name}): CNI ADD with {}: {e}",
            st.conflist.display()
        )
    })?)?;
    let (peer_ip, peer_veth) = chain::ip_and_veth(&peer_result);
    env.attached
        .push((st.chain.clone(), peer_att, Some(peer_result)));
    env.veths.extend(peer_veth.clone());
    let peer_ip = peer_ip.context("the bridge plugin gave the peer no IPv4 address")?;
    env.peer = Some(PeerListener::start(&peer_ns, peer_ip)?);
    let peer_addr = SocketAddr::from((peer_ip, PEER_PORT));
    for p in pods.iter_mut() {
        checkpoint()?;
        let ns = add_netns(env, &p.netns_name, host)?;
        let started = Instant::now();
        // A runtime retries a sandbox whose ADD failed with "try again" (code 11).
        let mut attempt = 0;
        let results = loop {
            attempt += 1;
            let err = match st.chain.add(&p.att) {
                Ok(r) => break r,
                Err((i, out)) => ChainError::from_exec(&st.chain, i, &out),
            };
            // The runtime tears the sandbox down after a failed ADD.
            let _ = st.chain.del(&p.att, None);
            if err.code != Some(11) || attempt >= 5 {
                bail!(
                    "pod {NAMESPACE}/{} (netns {}): CNI ADD: {err}",
                    p.name,
                    p.netns_name
                );
            }
            p.add_note = format!(" (retried: {})", err.msg);
            std::thread::sleep(Duration::from_secs(1));
        };
        let result = final_result(results)?;
        p.add_ms = started.elapsed().as_millis();
        let (ip, veth) = chain::ip_and_veth(&result);
        p.ip = ip;
        p.veth = veth.clone();
        env.veths.extend(veth);
        env.attached
            .push((st.chain.clone(), p.att.clone(), Some(result)));
        p.netns = Some(ns);
    }
    let mut t = Table::new(&["POD", "NETNS", "IP", "HOST VETH", "CNI ADD"]);
    t.row(vec![
        "(peer)".into(),
        peer_name,
        peer_ip.to_string(),
        peer_veth.unwrap_or_else(|| "-".into()),
        format!("not a pod (passed through); listening on :{PEER_PORT}"),
    ]);
    for p in pods.iter() {
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            p.netns_name.clone(),
            p.ip.map_or_else(|| "-".into(), |i| i.to_string()),
            p.veth.clone().unwrap_or_else(|| "-".into()),
            format!("ok in {} ms{}", p.add_ms, p.add_note),
        ]);
    }
    t.print();
    Ok((peer_ns, peer_addr))
}

/// The chain's result: the last plugin's.
fn final_result(mut results: Vec<Value>) -> Result<Value> {
    results.pop().context("CNI ADD: empty chain")
}

/// The in-pod rules as the demo reads them in `ns`: the cell for the table and
/// whether any are there at all. `agent_ok` is the agent's own completeness check.
fn rules_cell(redirector: &Redirector, ns: &Netns, agent_ok: bool) -> (String, bool) {
    // Reading what is installed does not depend on the options; the agent judges them.
    match redirector.show(ns, &InpodConfig::default()) {
        Ok(r) => {
            let n: usize = r.installed.sections.iter().map(|s| s.lines.len()).sum();
            let any = !(r.installed.is_empty() && r.route.is_empty());
            let state = if !any {
                "none".to_owned()
            } else if agent_ok {
                format!("{n} rules + route, complete")
            } else {
                format!("{n} rules, INCOMPLETE")
            };
            (format!("{}: {state}", r.installed.backend), any)
        }
        Err(e) => (format!("cannot read: {e}"), true),
    }
}

/// True once the pod `uid` is released everywhere: the agent no longer holds it
/// captured, no rules are left in `ns`, and the stand-in got its DelWorkload.
pub fn released(
    status: &Status,
    redirector: &Redirector,
    ns: &Netns,
    uid: &str,
    events_file: &Path,
) -> bool {
    let (_, any) = rules_cell(redirector, ns, false);
    let del = standin_events(events_file)
        .iter()
        .any(|e| e["event"] == "del" && e["uid"] == uid);
    !status.captured(uid) && !any && del
}

/// Prints each pod's state; returns the names of the pods captured.
pub fn status_table<'a>(
    pods: &'a [Pod],
    status: &Status,
    redirector: &Redirector,
    events_file: &Path,
) -> Result<Vec<&'a str>> {
    let events = standin_events(events_file);
    let mut t = Table::new(&[
        "POD",
        "CAPTURED",
        "RULES (backend: state)",
        "STAND-IN LISTENING",
    ]);
    let mut captured = Vec::new();
    for p in pods {
        checkpoint()?;
        let ns = p.netns.as_ref().context("pod without netns")?;
        let held = status.captured(&p.uid);
        let (rules, _) = rules_cell(redirector, ns, held);
        let ports: Vec<String> = listening_ports(ns)
            .into_iter()
            .filter(|p| (15000..16000).contains(p))
            .map(|p| p.to_string())
            .collect();
        let listening = !ports.is_empty();
        let added = events
            .iter()
            .rev()
            .find(|e| e["uid"] == p.uid.as_str() && (e["event"] == "add" || e["event"] == "del"))
            .is_some_and(|e| e["event"] == "add" && e["result"] != "nacked");
        let yes = held && listening && added;
        if yes {
            captured.push(p.name.as_str());
        }
        t.row(vec![
            format!("{NAMESPACE}/{}", p.name),
            if yes { "yes".into() } else { "no".into() },
            rules,
            if listening {
                ports.join(",")
            } else {
                "-".into()
            },
        ]);
    }
    t.print();
    Ok(captured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_objects_parse_as_kubernetes_pods() {
        let v = pod_json("web-0", "u1", Some("none"));
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(v).unwrap();
        assert_eq!(
            pod.metadata
                .labels
                .unwrap()
                .get("istio.io/dataplane-mode")
                .map(String::as_str),
            Some("none")
        );
    }

    #[test]
    fn pods_get_a_kubelet_style_attachment_in_their_own_netns() {
        let p = Pod::new(42, 1);
        assert_eq!(p.netns_name, "ambient-demo-42-web-1");
        assert_eq!(p.att.netns, "/var/run/netns/ambient-demo-42-web-1");
        assert!(p
            .att
            .args
            .contains("K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1"));
        assert!(p.att.args.contains("K8S_POD_UID=demo-42-1"));
    }
}
