//! The agent end to end against STOCK ztunnel (`ZTUNNEL_BIN`, see ../shared/peers/README.md):
//! real netns pods through the real CNI chain (bridge + host-local + ambient-cni), the agent
//! process with a local pod source, and ztunnel in a netns of its own as the ZDS client.
//! Real TCP goes through ztunnel's in-pod listeners, with both rules backends.
//!
//! Skips without `ZTUNNEL_BIN` (or root); fails instead when `CI` is set.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::peers::*;
use ambient_cni_tests::*;
use iptables_rules::netns::Netns;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(20);
const MESH: &str = "mesh";
const PLAIN: &str = "plain";
/// ztunnel's in-pod ports (15053: DNS capture is on by default).
const ZT_PORTS: [u16; 4] = [15001, 15006, 15008, 15053];

/// A netns pod added through the chain.
struct Pod {
    netns: NamedNetns,
    att: Attachment,
    result: Value,
    name: String,
    uid: String,
    ip: String,
}

/// Agent + stock ztunnel(s) + a bridge; namespace `mesh` labelled ambient, `plain` not.
struct World {
    dir: TempDir,
    bin: PathBuf,
    backend: &'static str,
    subnet: u8,
    bridge: HostLink,
    agent: Option<AgentProcess>,
    ztunnels: Vec<Ztunnel>,
    started: usize,
}

impl World {
    /// Writes the xDS file for the `mesh` pods named in `mesh_pods` (ztunnel reads it only at
    /// start), starts the agent, then one ztunnel, and waits until ztunnel is ready.
    fn new(bin: PathBuf, backend: &'static str, subnet: u8, mesh_pods: &[String]) -> Self {
        Self::with_services(bin, backend, subnet, mesh_pods, &[])
    }

    /// [`World::new`] with `services` (entries of the xDS file's `services` list) added.
    fn with_services(
        bin: PathBuf,
        backend: &'static str,
        subnet: u8,
        mesh_pods: &[String],
        services: &[Value],
    ) -> Self {
        Self::with_agent_flags(bin, backend, subnet, mesh_pods, services, &[])
    }

    /// [`World::with_services`] with `extra` agent flags.
    fn with_agent_flags(
        bin: PathBuf,
        backend: &'static str,
        subnet: u8,
        mesh_pods: &[String],
        services: &[Value],
        extra: &[&'static str],
    ) -> Self {
        let dir = TempDir::new("acni-zt");
        let pods = dir.join("pods");
        write_namespace(&pods, MESH, json!({"istio.io/dataplane-mode": "ambient"}));
        write_namespace(&pods, PLAIN, json!({}));
        let wl: Vec<XdsWorkload> = mesh_pods
            .iter()
            .map(|n| XdsWorkload::new(MESH, n, &format!("sa-{n}")))
            .collect();
        let mut xds: Value = serde_json::from_str(&xds_yaml(&wl)).expect("xds is JSON");
        xds["services"] = Value::Array(services.to_vec());
        std::fs::write(dir.join("xds.yaml"), xds.to_string()).expect("xds file");
        let mut flags = agent_flags(backend);
        flags.extend(extra);
        let agent = AgentProcess::start(&dir.0, &flags);
        let mut me = Self {
            dir,
            bin,
            backend,
            subnet,
            bridge: HostLink(unique("acbr")),
            agent: Some(agent),
            ztunnels: Vec::new(),
            started: 0,
        };
        me.start_ztunnel();
        me
    }

    /// Starts one more ztunnel and waits for its readiness (= it has our snapshot).
    fn start_ztunnel(&mut self) -> usize {
        self.started += 1;
        let log = self.dir.join(&format!("ztunnel{}.log", self.started));
        // Its DNS proxy logs every query (target `dns`, debug) and forwards names it does not
        // know to a dead loopback resolver: nothing ever leaves for the host's resolvers.
        let opts = ZtunnelOptions {
            rust_log: Some("info,dns=debug".into()),
            resolv_conf: Some("nameserver 127.0.0.1\n".into()),
        };
        let z = Ztunnel::start_with(
            &self.bin,
            &self.dir.join("ztunnel.sock"),
            &self.dir.join("xds.yaml"),
            &log,
            &opts,
        );
        let ok = z.wait_ready(LONG);
        self.ztunnels.push(z);
        assert!(ok, "ztunnel not ready:\n{}", self.diag());
        self.ztunnels.len() - 1
    }

    fn zt(&self, i: usize) -> &Ztunnel {
        &self.ztunnels[i]
    }

    /// Everything useful when an assertion fails.
    fn diag(&self) -> String {
        let mut s = String::new();
        if let Some(a) = &self.agent {
            s += &format!("--- agent log:\n{}\n", a.log_text());
        }
        for (i, z) in self.ztunnels.iter().enumerate() {
            s += &format!(
                "--- ztunnel #{i} (pid {}) log:\n{}\n",
                z.pid(),
                z.log_text()
            );
        }
        s
    }

    fn chain(&self) -> Chain {
        Chain::bridge_then(
            "1.0.0",
            &self.bridge.0,
            &format!("10.99.{}.0/24", self.subnet),
            &self.dir.0,
            plugin_entry(&self.dir.join("plugin.sock"), 5000),
        )
    }

    /// Writes the pod object, then runs the chain ADD for it in a fresh netns; panics on failure.
    fn add_pod(&self, ns: &str, name: &str) -> Pod {
        let netns = NamedNetns::new();
        let uid = format!("{}-{name}", netns.name());
        write_pod(&self.dir.join("pods"), ns, name, &uid, None, json!({}));
        let att = Attachment::pod(&netns.path(), ns, name, &uid);
        let results = self
            .chain()
            .add(&att)
            .unwrap_or_else(|(i, e)| panic!("ADD {ns}/{name}: plugin {i}: {e:?}\n{}", self.diag()));
        assert_eq!(results[1], results[0], "our output is the prevResult");
        let ip = results[0]["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .expect("bridge result has an IP")
            .to_owned();
        Pod {
            netns,
            att,
            result: results[1].clone(),
            name: name.to_owned(),
            uid,
            ip,
        }
    }

    fn del_pod(&self, pod: &Pod) {
        self.chain()
            .del(&pod.att, Some(&pod.result))
            .unwrap_or_else(|(i, e)| panic!("DEL plugin {i}: {e:?}"));
        delete_pod(&self.dir.join("pods"), &format!("{MESH}_{}", pod.name));
    }

    fn rules(&self, ns: &NamedNetns) -> usize {
        rules_count(ns, self.backend)
    }

    /// Waits until `cond` holds; panics with `what` and the logs otherwise.
    fn wait(&self, what: &str, cond: impl FnMut() -> bool) {
        assert!(wait_for(LONG, cond), "timed out: {what}\n{}", self.diag());
    }
}

/// The agent's flags: the backend, and ports that do not collide with parallel tests.
fn agent_flags(backend: &'static str) -> Vec<&'static str> {
    let mut f = vec!["--rules-backend", backend];
    f.extend(EPHEMERAL_PORTS);
    f
}

/// In-pod redirection present: the nat jump (iptables) or our nat table (nftables).
fn rules_count(ns: &NamedNetns, backend: &str) -> usize {
    if backend == "nftables" {
        let out = ns.exec(&["nft", "list", "tables"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("istio-ambient"))
            .count()
    } else {
        let out = ns.exec(&["iptables-save"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("ISTIO_"))
            .count()
    }
}

fn has_zt_ports(ns: &NamedNetns) -> bool {
    let ports = listening_ports(ns);
    ZT_PORTS.iter().all(|p| ports.contains(p))
}

fn no_zt_ports(ns: &NamedNetns) -> bool {
    let ports = listening_ports(ns);
    !ZT_PORTS.iter().any(|p| ports.contains(p))
}

/// The listener inode of ztunnel's outbound port in a pod.
fn outbound_inode(ns: &NamedNetns) -> Option<u64> {
    listeners(ns)
        .into_iter()
        .find(|l| l.port == 15001)
        .map(|l| l.inode)
}

/// Client (outside the mesh) → mesh pod's server: through ztunnel's inbound, with the client's IP.
fn assert_inbound(w: &World, z: usize, client: &Pod, server: &Pod, port: u16) {
    let srv = PeerEchoServer::start(&server.netns, port);
    let to = format!("{}:{port}", server.ip);
    let (local, line) = connect_from(&client.netns, &to)
        .unwrap_or_else(|e| panic!("inbound connect to {to}: {e}\n{}", w.diag()));
    assert_eq!(local.ip().to_string(), client.ip);
    let peers: Vec<SocketAddr> = srv.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(line, format!("peer={}", peers[0]));
    // The app sees the client's own IP (ztunnel connects with the client's source address,
    // which only works with the CONNMARK rules and policy route), from ztunnel's own
    // socket: another port than the client's, so the connection did go through a proxy.
    assert_eq!(peers[0].ip(), local.ip(), "{}", w.diag());
    assert_ne!(peers[0].port(), local.port(), "not proxied?");
    // ztunnel's access log names the connection and the pod (its workload, by name).
    let dst = format!("dst.addr={to}");
    w.wait("ztunnel logs the inbound connection", || {
        w.zt(z)
            .log_lines_with(&[&dst, "direction=\"inbound\"", &server.name])
            .iter()
            .any(|l| l.contains(&format!("src.addr={local}")))
    });
    for l in w.zt(z).log_lines_with(&[&dst, "direction=\"inbound\""]) {
        eprintln!("ztunnel: {l}");
    }
}

/// Mesh pod → a server elsewhere: through ztunnel's outbound (its log shows the connection).
fn assert_outbound(w: &World, z: usize, from: &Pod, server: &Pod, port: u16) {
    let srv = PeerEchoServer::start(&server.netns, port);
    let to = format!("{}:{port}", server.ip);
    let (local, line) = connect_from(&from.netns, &to)
        .unwrap_or_else(|e| panic!("outbound connect to {to}: {e}\n{}", w.diag()));
    assert!(line.starts_with("peer="), "{line}");
    let seen = srv.peers();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].ip().to_string(), from.ip, "source is the pod's IP");
    let dst = format!("dst.addr={to}");
    w.wait("ztunnel logs the outbound connection", || {
        !w.zt(z)
            .log_lines_with(&[&dst, "direction=\"outbound\""])
            .is_empty()
    });
    for l in w.zt(z).log_lines_with(&[&dst, "direction=\"outbound\""]) {
        eprintln!("ztunnel: {l} (client side {local})");
    }
}

fn traffic_and_release(backend: &'static str, subnet: u8) {
    let test = format!("stock_ztunnel_traffic_and_release_{backend}");
    let Some(bin) = ztunnel_bin(&test) else {
        return;
    };
    let mut w = World::new(bin, backend, subnet, &["web".into(), "api".into()]);
    let web = w.add_pod(MESH, "web");
    let api = w.add_pod(MESH, "api");
    let client = w.add_pod(PLAIN, "client");

    // ztunnel listens inside the mesh pods, not in the plain one.
    for p in [&web, &api] {
        w.wait(&format!("ztunnel listens in {}", p.name), || {
            has_zt_ports(&p.netns)
        });
        assert!(w.rules(&p.netns) > 0);
        let owners = port_owners(&p.netns, 15001);
        assert_eq!(owners, vec![w.zt(0).pid()], "ztunnel owns the listener");
    }
    assert!(no_zt_ports(&client.netns));
    assert_eq!(w.rules(&client.netns), 0);
    let states = w.zt(0).workload_states().expect("config_dump");
    assert_eq!(
        states.get(&web.uid).map(String::as_str),
        Some("Up"),
        "{states:?}"
    );

    assert_inbound(&w, 0, &client, &web, 8080);
    assert_outbound(&w, 0, &web, &client, 9090);

    // Release of a running pod (label `none`): rules out, ztunnel's proxy gone, traffic direct.
    write_pod(
        &w.dir.join("pods"),
        MESH,
        "web",
        &web.uid,
        None,
        json!({"istio.io/dataplane-mode": "none"}),
    );
    w.wait("web released: no rules", || w.rules(&web.netns) == 0);
    w.wait("web released: no ztunnel listeners", || {
        no_zt_ports(&web.netns)
    });
    w.wait("ztunnel forgot web", || {
        w.zt(0)
            .workload_states()
            .is_some_and(|s| !s.contains_key(&web.uid))
    });
    let srv = PeerEchoServer::start(&web.netns, 8081);
    let (local, line) = connect_from(&client.netns, &format!("{}:8081", web.ip)).expect("direct");
    assert_eq!(line, format!("peer={local}"));
    drop(srv);
    assert!(
        w.zt(0)
            .log_lines_with(&[&format!("dst.addr={}:8081", web.ip)])
            .is_empty(),
        "a released pod's traffic does not touch ztunnel"
    );

    // DEL of a deleted pod: ztunnel drops its proxy; the netns then goes away with its rules.
    w.del_pod(&api);
    w.wait("api's listeners gone after DEL", || no_zt_ports(&api.netns));
    w.wait("ztunnel forgot api", || {
        w.zt(0)
            .workload_states()
            .is_some_and(|s| !s.contains_key(&api.uid))
    });
    // The runtime then deletes the netns, and the rules with it.
    let api_netns = api.netns.path();
    drop(api);
    assert!(!std::path::Path::new(&api_netns).exists());
    assert!(w.ztunnels[0].alive(), "ztunnel exited\n{}", w.diag());
    assert!(
        !w.zt(0).log_text().contains("protocol mismatch"),
        "{}",
        w.diag()
    );
}

#[test]
fn stock_ztunnel_traffic_and_release_iptables() {
    traffic_and_release("iptables", 61);
}

#[test]
fn stock_ztunnel_traffic_and_release_nftables() {
    traffic_and_release("nftables", 62);
}

/// `ambient-cni-agent status --json` of the running agent.
fn agent_status(w: &World) -> Value {
    let out = std::process::Command::new(agent_bin())
        .args(["status", "--json", "--run-dir"])
        .arg(w.dir.join("run"))
        .output()
        .expect("exec agent status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Log text after the last line containing `marker`.
fn after_last<'a>(text: &'a str, marker: &str) -> &'a str {
    text.rfind(marker).map_or("", |i| &text[i..])
}

fn agent_restart_keeps_proxies(backend: &'static str, subnet: u8) {
    let test = format!("agent_kill_9_restart_with_20_pods_{backend}");
    let Some(bin) = ztunnel_bin(&test) else {
        return;
    };
    let names: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    let mut w = World::new(bin, backend, subnet, &names);
    let pods: Vec<Pod> = names.iter().map(|n| w.add_pod(MESH, n)).collect();
    let client = w.add_pod(PLAIN, "client");
    let mut inodes = Vec::new();
    for p in &pods {
        w.wait(&format!("ztunnel listens in {}", p.name), || {
            has_zt_ports(&p.netns)
        });
        inodes.push(outbound_inode(&p.netns).expect("15001 inode"));
    }
    assert_eq!(agent_status(&w)["pods"].as_array().map(Vec::len), Some(20));

    // kill -9: ztunnel keeps every proxy (same sockets) and reports not-ready.
    w.agent.as_mut().expect("agent").kill();
    w.wait("ztunnel not ready without the agent", || !w.zt(0).ready());
    for (p, ino) in pods.iter().zip(&inodes) {
        assert_eq!(outbound_inode(&p.netns), Some(*ino), "{} kept", p.name);
        assert!(w.rules(&p.netns) > 0, "rules stay in {}", p.name);
    }
    // Two pods are deleted while the agent is down.
    for p in &pods[18..] {
        delete_pod(&w.dir.join("pods"), &format!("{MESH}_{}", p.name));
    }

    let restarted = std::time::Instant::now();
    w.agent = Some(AgentProcess::start(&w.dir.0, &agent_flags(backend)));
    w.wait("ztunnel ready again after the agent's restart", || {
        w.zt(0).ready()
    });
    eprintln!(
        "{backend}: agent restart to ztunnel ready with 20 pods: {:?}",
        restarted.elapsed()
    );
    // The two deleted pods are drained: their proxies go.
    for p in &pods[18..] {
        w.wait(&format!("{} drained", p.name), || no_zt_ports(&p.netns));
    }
    assert!(w.ztunnels[0].alive(), "ztunnel exited\n{}", w.diag());
    let log = w.zt(0).log_text();
    assert!(!log.contains("protocol mismatch"), "{}", w.diag());
    // One snapshot before the kill, one on the new connection. (A SIGKILLed agent cannot
    // close its listener before its connections: ztunnel's instant reconnect may land in the
    // dying backlog and be reset, an extra stream without a snapshot, retried at once.)
    assert_eq!(count(&log, "received snapshot sent"), 2, "{}", w.diag());
    eprintln!(
        "{backend}: ztunnel streams {}, resets {}",
        count(&log, "handling new stream"),
        count(&log, "Connection reset by peer")
    );
    let second = after_last(&log, "handling new stream");
    assert_eq!(
        count(second, "received snapshot sent"),
        1,
        "exactly one snapshot on the new connection\n{}",
        w.diag()
    );
    // Every live pod keeps the very same proxy listener (re-add of the same netns is a no-op).
    for (p, ino) in pods[..18].iter().zip(&inodes) {
        assert_eq!(
            outbound_inode(&p.netns),
            Some(*ino),
            "{}\n{}",
            p.name,
            w.diag()
        );
        assert_eq!(port_owners(&p.netns, 15001), vec![w.zt(0).pid()]);
    }
    let states = w.zt(0).workload_states().expect("config_dump");
    assert_eq!(states.len(), 18, "{states:?}");
    assert!(pods[..18]
        .iter()
        .all(|p| states.get(&p.uid).map(String::as_str) == Some("Up")));
    let st = agent_status(&w);
    assert_eq!(st["ztunnel_connections"], 1, "{st}");
    assert_eq!(st["pods"].as_array().map(Vec::len), Some(18), "{st}");
    // Traffic still goes through ztunnel.
    assert_inbound(&w, 0, &client, &pods[0], 8080);
    assert_outbound(&w, 0, &pods[17], &client, 9090);
}

#[test]
fn agent_kill_9_restart_with_20_pods_iptables() {
    agent_restart_keeps_proxies("iptables", 63);
}

#[test]
fn agent_kill_9_restart_with_20_pods_nftables() {
    agent_restart_keeps_proxies("nftables", 64);
}

fn ztunnel_restart_and_rolling_update(backend: &'static str, subnet: u8) {
    let test = format!("ztunnel_restart_and_rolling_update_{backend}");
    let Some(bin) = ztunnel_bin(&test) else {
        return;
    };
    let names = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
    let mut w = World::new(bin, backend, subnet, &names);
    let a = w.add_pod(MESH, "a");
    let b = w.add_pod(MESH, "b");
    let client = w.add_pod(PLAIN, "client");
    w.wait("listeners in a", || has_zt_ports(&a.netns));
    assert_inbound(&w, 0, &client, &a, 8080);

    // ztunnel dies: its proxies die with it, and the pod fails closed (nothing bypasses the mesh).
    w.ztunnels[0].kill();
    w.wait("a's listeners gone with ztunnel", || no_zt_ports(&a.netns));
    {
        let _srv = PeerEchoServer::start(&a.netns, 8082);
        let r = connect_from(&client.netns, &format!("{}:8082", a.ip));
        assert!(
            r.is_err(),
            "no ztunnel: inbound must not reach the app: {r:?}"
        );
    }

    // A new ztunnel gets the agent's replay (snapshot) and traffic works again.
    let z1 = w.start_ztunnel();
    for p in [&a, &b] {
        w.wait(&format!("{} re-proxied by the new ztunnel", p.name), || {
            port_owners(&p.netns, 15001) == vec![w.zt(z1).pid()]
        });
    }
    let log = w.zt(z1).log_text();
    let snap = log.find("received snapshot sent").expect("snapshot");
    for p in [&a, &b] {
        let add = log
            .find(&format!("uid=\"{}\"", p.uid))
            .unwrap_or_else(|| panic!("{} not replayed\n{}", p.name, w.diag()));
        assert!(add < snap, "{} replayed inside the snapshot", p.name);
    }
    assert_inbound(&w, z1, &client, &a, 8083);

    // Rolling update: a second ztunnel connects while the first still runs.
    let z2 = w.start_ztunnel();
    w.wait("agent holds two ztunnel connections", || {
        agent_status(&w)["ztunnel_connections"] == 2
    });
    for p in [&a, &b] {
        let mut both = vec![w.zt(z1).pid(), w.zt(z2).pid()];
        both.sort();
        w.wait(&format!("{} proxied by both ztunnels", p.name), || {
            port_owners(&p.netns, 15001) == both
        });
    }
    // Adds go to the newest only.
    let c = w.add_pod(MESH, "c");
    w.wait("c in the new ztunnel", || {
        w.zt(z2)
            .workload_states()
            .is_some_and(|s| s.get(&c.uid).map(String::as_str) == Some("Up"))
    });
    let old = w.zt(z1).workload_states().expect("old config_dump");
    assert!(
        !old.contains_key(&c.uid),
        "the old ztunnel got the add: {old:?}"
    );
    assert!(
        old.contains_key(&a.uid) && old.contains_key(&b.uid),
        "{old:?}"
    );
    assert_eq!(port_owners(&c.netns, 15001), vec![w.zt(z2).pid()]);
    // Deletes go to both.
    w.del_pod(&b);
    for z in [z1, z2] {
        w.wait(&format!("b gone from ztunnel #{z}"), || {
            w.zt(z)
                .workload_states()
                .is_some_and(|s| !s.contains_key(&b.uid))
        });
    }
    w.wait("b's listeners gone", || no_zt_ports(&b.netns));
    assert!(
        !w.zt(z1)
            .log_lines_with(&["pod delete request", &b.uid])
            .is_empty()
            && !w
                .zt(z2)
                .log_lines_with(&["pod delete request", &b.uid])
                .is_empty(),
        "{}",
        w.diag()
    );

    // The old one leaves; the new one carries the traffic alone.
    for z in [z1, z2] {
        assert!(w.ztunnels[z].alive(), "ztunnel #{z} exited\n{}", w.diag());
        assert!(!w.zt(z).log_text().contains("protocol mismatch"));
    }
    w.ztunnels[z1].kill();
    w.wait("one connection left", || {
        agent_status(&w)["ztunnel_connections"] == 1
    });
    assert_inbound(&w, z2, &client, &c, 8084);
    assert_inbound(&w, z2, &client, &a, 8085);
    assert_outbound(&w, z2, &c, &client, 9091);
}

#[test]
fn ztunnel_restart_and_rolling_update_iptables() {
    ztunnel_restart_and_rolling_update("iptables", 65);
}

#[test]
fn ztunnel_restart_and_rolling_update_nftables() {
    ztunnel_restart_and_rolling_update("nftables", 66);
}

/// A service that only ztunnel's local xDS knows: no resolver anywhere has this name.
const DNS_NAME: &str = "web.mesh.svc.cluster.local";
/// Its VIP, from the benchmarking range (RFC 2544): only ever a DNS answer, never a destination.
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 67, 10);

/// The xDS `services` entry for [`DNS_NAME`].
fn dns_service() -> Value {
    json!({
        "name": "web",
        "namespace": MESH,
        "hostname": DNS_NAME,
        "vips": [format!("/{DNS_VIP}")],
        "ports": {},
    })
}

/// A DNS answer, as far as the test reads it.
#[derive(Debug)]
struct DnsReply {
    /// Where it came from, as the asking socket sees it.
    from: SocketAddr,
    rcode: u8,
    /// The A records.
    a: Vec<Ipv4Addr>,
}

/// A DNS query (RD set) for the A record of `name`.
fn dns_a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    // Flags RD; one question, no other records.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("label length"));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // QTYPE A, QCLASS IN
    q
}

/// The index after the (possibly compressed) name at `i`.
fn skip_dns_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        if len & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        if len == 0 {
            return Some(i + 1);
        }
        i += 1 + usize::from(len);
    }
}

/// (rcode, A records) of the response `b` to query `id`.
fn parse_dns_reply(b: &[u8], id: u16) -> Result<(u8, Vec<Ipv4Addr>), String> {
    let u16_at = |i: usize| -> Result<u16, String> {
        match (b.get(i), b.get(i + 1)) {
            (Some(h), Some(l)) => Ok(u16::from_be_bytes([*h, *l])),
            _ => Err(format!("truncated DNS message: {b:02x?}")),
        }
    };
    if u16_at(0)? != id {
        return Err(format!("answer to another query: {b:02x?}"));
    }
    let flags = u16_at(2)?;
    if flags & 0x8000 == 0 {
        return Err(format!("not a response: {b:02x?}"));
    }
    let truncated = || format!("truncated DNS message: {b:02x?}");
    let mut i = 12;
    for _ in 0..u16_at(4)? {
        i = skip_dns_name(b, i).ok_or_else(truncated)? + 4;
    }
    let mut a = Vec::new();
    for _ in 0..u16_at(6)? {
        i = skip_dns_name(b, i).ok_or_else(truncated)?;
        let (rtype, rdlen) = (u16_at(i)?, usize::from(u16_at(i + 8)?));
        i += 10;
        let rdata = b.get(i..i + rdlen).ok_or_else(truncated)?;
        if rtype == 1 && rdlen == 4 {
            a.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        i += rdlen;
    }
    Ok(((flags & 0xf) as u8, a))
}

/// Sends one UDP A query for `name` from inside `ns` to `to`; waits at most `wait` for the answer.
fn dns_query_from(
    ns: &NamedNetns,
    to: SocketAddr,
    name: &str,
    id: u16,
    wait: Duration,
) -> Result<DnsReply, String> {
    let h = Netns::open(Path::new(&ns.path()), None).map_err(|e| e.to_string())?;
    let query = dns_a_query(id, name);
    h.run(move || -> Result<DnsReply, String> {
        // Unconnected: an ICMP port unreachable is not reported, no answer means a timeout.
        let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| format!("bind: {e}"))?;
        s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
        s.send_to(&query, to)
            .map_err(|e| format!("send to {to}: {e}"))?;
        let mut buf = [0u8; 1500];
        let (n, from) = s
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer from {to} within {wait:?}: {e}"))?;
        let (rcode, a) = parse_dns_reply(&buf[..n], id)?;
        Ok(DnsReply { from, rcode, a })
    })
    .map_err(|e| e.to_string())?
}

/// The same over TCP (two-byte length prefix); connect, write and read bounded by `wait`.
fn dns_query_tcp_from(
    ns: &NamedNetns,
    to: SocketAddr,
    name: &str,
    id: u16,
    wait: Duration,
) -> Result<DnsReply, String> {
    let h = Netns::open(Path::new(&ns.path()), None).map_err(|e| e.to_string())?;
    let query = dns_a_query(id, name);
    h.run(move || -> Result<DnsReply, String> {
        let mut s = TcpStream::connect_timeout(&to, wait).map_err(|e| format!("{to}: {e}"))?;
        s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
        let len = u16::try_from(query.len()).expect("query length");
        let mut msg = len.to_be_bytes().to_vec();
        msg.extend_from_slice(&query);
        s.write_all(&msg)
            .map_err(|e| format!("send to {to}: {e}"))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)
            .map_err(|e| format!("no answer from {to} within {wait:?}: {e}"))?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf)
            .map_err(|e| format!("short answer from {to}: {e}"))?;
        let from = s.peer_addr().map_err(|e| e.to_string())?;
        let (rcode, a) = parse_dns_reply(&buf, id)?;
        Ok(DnsReply { from, rcode, a })
    })
    .map_err(|e| e.to_string())?
}

/// The UDP ports bound in `ns` (`ss -Hlun`).
fn udp_ports(ns: &NamedNetns) -> Vec<u16> {
    let out = ns.exec(&["ss", "-Hlun"]);
    let mut p: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    p.sort();
    p.dedup();
    p
}

/// ztunnel's DNS access log lines (target `dns`, debug) for [`DNS_NAME`] asked by `pod`.
fn dns_log(w: &World, z: usize, pod: &Pod) -> Vec<String> {
    w.zt(z).log_lines_with(&[
        "\tdns\t",
        &format!("domain=\"{DNS_NAME}."),
        &format!("src.workload=\"{}\"", pod.name),
    ])
}

fn dns_captured_and_answered(backend: &'static str, subnet: u8) {
    let test = format!("stock_ztunnel_answers_captured_dns_{backend}");
    let Some(bin) = ztunnel_bin(&test) else {
        return;
    };
    let w = World::with_services(bin, backend, subnet, &["web".into()], &[dns_service()]);
    let web = w.add_pod(MESH, "web");
    let client = w.add_pod(PLAIN, "client");
    w.wait("ztunnel listens in web", || has_zt_ports(&web.netns));
    w.wait("ztunnel's DNS proxy has its UDP socket in web", || {
        udp_ports(&web.netns).contains(&15053)
    });
    // Where the mesh pod sends its query: the plain pod, where no socket at all is bound.
    let nameserver = SocketAddr::from((client.ip.parse::<Ipv4Addr>().expect("ip"), 53));
    assert_eq!(udp_ports(&client.netns), Vec::<u16>::new());
    assert!(!udp_ports(&web.netns).contains(&53));

    // Mesh pod: the query is captured by the in-pod rules (udp/53 → 15053) and ztunnel's DNS
    // proxy answers with the VIP that only its xDS knows, from the address asked (NAT undone).
    let started = std::time::Instant::now();
    let mut reply = Err("not asked".to_owned());
    for id in 0x6701..0x6706 {
        reply = dns_query_from(&web.netns, nameserver, DNS_NAME, id, Duration::from_secs(1));
        if reply.is_ok() {
            break;
        }
    }
    let reply =
        reply.unwrap_or_else(|e| panic!("{backend}: mesh pod's DNS query: {e}\n{}", w.diag()));
    eprintln!(
        "{backend}: mesh pod asked {nameserver} for {DNS_NAME}: {reply:?} in {:?}",
        started.elapsed()
    );
    assert_eq!(reply.rcode, 0, "{reply:?}\n{}", w.diag());
    assert_eq!(reply.a, vec![DNS_VIP], "{reply:?}\n{}", w.diag());
    assert_eq!(reply.from, nameserver, "{reply:?}");
    // DNS over TCP/53 is captured too (→ ztunnel's TCP listener on 15053).
    let tcp = dns_query_tcp_from(
        &web.netns,
        nameserver,
        DNS_NAME,
        0x6708,
        Duration::from_secs(2),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{backend}: mesh pod's DNS query over TCP: {e}\n{}",
            w.diag()
        )
    });
    assert_eq!((tcp.rcode, &tcp.a), (0, &vec![DNS_VIP]), "{tcp:?}");
    assert_eq!(tcp.from, nameserver, "{tcp:?}");
    // ztunnel's upstream is the dead loopback resolver we gave it: the VIP came from its xDS.
    // ztunnel's own filesystem view, through its process's root link.
    let zt_root = std::path::PathBuf::from(format!("/proc/{}", w.zt(0).pid())).join("root");
    let resolv = std::fs::read_to_string(zt_root.join("etc/resolv.conf")).unwrap_or_default();
    assert_eq!(resolv, "nameserver 127.0.0.1\n", "ztunnel's resolv.conf");
    w.wait("ztunnel logs the DNS queries (UDP and TCP)", || {
        dns_log(&w, 0, &web)
            .iter()
            .filter(|l| l.contains("result=\"success\"") && l.contains("src.namespace=\"mesh\""))
            .count()
            >= 2
    });
    for l in dns_log(&w, 0, &web) {
        eprintln!("ztunnel: {l}");
    }

    // Non-mesh pod: the same query to the mesh pod's address gets no answer (nothing captures
    // it, and ztunnel's proxy in web listens on loopback 15053 only).
    let to_web = SocketAddr::from((web.ip.parse::<Ipv4Addr>().expect("ip"), 53));
    let plain = dns_query_from(
        &client.netns,
        to_web,
        DNS_NAME,
        0x6710,
        Duration::from_millis(1500),
    );
    assert!(
        plain.is_err(),
        "{backend}: a non-mesh pod got a DNS answer: {plain:?}"
    );
    assert!(dns_log(&w, 0, &client).is_empty(), "{}", w.diag());

    // Release (label `none`): rules and ztunnel's proxy go; the very same query from the same
    // pod to the same address then gets no answer, and ztunnel sees no new query.
    let asked = dns_log(&w, 0, &web).len();
    write_pod(
        &w.dir.join("pods"),
        MESH,
        "web",
        &web.uid,
        None,
        json!({"istio.io/dataplane-mode": "none"}),
    );
    w.wait("web released: no rules", || w.rules(&web.netns) == 0);
    w.wait("web released: no ztunnel listeners", || {
        no_zt_ports(&web.netns) && !udp_ports(&web.netns).contains(&15053)
    });
    let released = dns_query_from(
        &web.netns,
        nameserver,
        DNS_NAME,
        0x6720,
        Duration::from_millis(1500),
    );
    assert!(
        released.is_err(),
        "{backend}: a released pod's DNS was still answered: {released:?}\n{}",
        w.diag()
    );
    let released_tcp = dns_query_tcp_from(
        &web.netns,
        nameserver,
        DNS_NAME,
        0x6721,
        Duration::from_millis(1500),
    );
    assert!(
        released_tcp.is_err(),
        "{backend}: a released pod's DNS over TCP was still answered: {released_tcp:?}"
    );
    assert_eq!(dns_log(&w, 0, &web).len(), asked, "{}", w.diag());
    assert!(!w.zt(0).log_text().contains("protocol mismatch"));
}

#[test]
fn stock_ztunnel_answers_captured_dns_iptables() {
    dns_captured_and_answered("iptables", 67);
}

#[test]
fn stock_ztunnel_answers_captured_dns_nftables() {
    dns_captured_and_answered("nftables", 68);
}

// ---- Issue 19: drift repair keeps the capture true; traffic goes through ztunnel again ----

/// Repairs the agent has logged so far (`in-pod capture drifted ... repaired`).
fn drift_repairs(w: &World) -> usize {
    let log = w.agent.as_ref().map(|a| a.log_text()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("in-pod capture drifted") && l.contains("repaired"))
        .count()
}

/// Tampers with `cmd` in the pod, then waits for the verifier (1 s interval) to repair it:
/// within one interval plus the repair itself.
fn tamper_and_wait(w: &World, pod: &Pod, what: &str, cmd: &[&str]) {
    let before = drift_repairs(w);
    let out = pod.netns.exec(cmd);
    assert!(
        out.status.success(),
        "{what}: {cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = std::time::Instant::now();
    w.wait(&format!("{what} repaired"), || drift_repairs(w) > before);
    let took = t0.elapsed();
    eprintln!("{what}: repaired after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "{what}: repaired after {took:?}, not within one 1 s interval\n{}",
        w.diag()
    );
}

/// The handle of the first rule of an nft chain in `ns`.
fn first_nft_handle(ns: &NamedNetns, table: &str, chain: &str) -> String {
    let out = ns.exec(&["nft", "-a", "list", "chain", "inet", table, chain]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("chain ") && !l.contains("type "))
        .find_map(|l| l.split("# handle ").nth(1))
        .map(|h| h.trim().to_owned())
        .expect("a rule with a handle")
}

fn drift_repaired(backend: &'static str, subnet: u8) {
    let test = format!("stock_ztunnel_drift_repaired_{backend}");
    let Some(bin) = ztunnel_bin(&test) else {
        return;
    };
    let w = World::with_agent_flags(
        bin,
        backend,
        subnet,
        &["web".into()],
        &[],
        &["--verify-interval", "1"],
    );
    let web = w.add_pod(MESH, "web");
    let client = w.add_pod(PLAIN, "client");
    w.wait("ztunnel listens in web", || has_zt_ports(&web.netns));
    assert_inbound(&w, 0, &client, &web, 8080);
    // A clean pod is verified (several passes) and never "repaired".
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(drift_repairs(&w), 0, "{}", w.diag());

    if backend == "nftables" {
        let nat = "istio-ambient-nat";
        tamper_and_wait(
            &w,
            &web,
            "flushed nat table",
            &["nft", "flush", "table", "inet", nat],
        );
        assert_inbound(&w, 0, &client, &web, 8081);
        let h = first_nft_handle(&web.netns, nat, "istio-output");
        tamper_and_wait(
            &w,
            &web,
            "rule replaced by another",
            &[
                "nft",
                "replace",
                "rule",
                "inet",
                nat,
                "istio-output",
                "handle",
                &h,
                "tcp",
                "dport",
                "9",
                "accept",
            ],
        );
    } else {
        let bin = iptables_rules::backend::iptables::Iptables::detect()
            .expect("iptables detected as the agent does")
            .tools(iptables_rules::model::Family::V4)
            .expect("iptables tools")
            .bin
            .clone();
        tamper_and_wait(&w, &web, "flushed nat chains", &[&bin, "-t", "nat", "-F"]);
        assert_inbound(&w, 0, &client, &web, 8081);
        tamper_and_wait(
            &w,
            &web,
            "rule replaced by another",
            &[&bin, "-t", "nat", "-R", "ISTIO_OUTPUT", "1", "-j", "ACCEPT"],
        );
    }
    tamper_and_wait(
        &w,
        &web,
        "policy route deleted",
        &[
            "ip",
            "route",
            "del",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    );
    tamper_and_wait(
        &w,
        &web,
        "fwmark rule deleted",
        &[
            "ip",
            "rule",
            "del",
            "fwmark",
            "0x111/0xfff",
            "pref",
            "32764",
            "lookup",
            "100",
        ],
    );
    // After every repair: TCP goes through ztunnel's inbound again (its access log).
    assert_inbound(&w, 0, &client, &web, 8082);
    assert!(w.rules(&web.netns) > 0);
}

#[test]
fn stock_ztunnel_drift_repaired_nftables() {
    drift_repaired("nftables", 69);
}

#[test]
fn stock_ztunnel_drift_repaired_iptables() {
    drift_repaired("iptables", 70);
}
