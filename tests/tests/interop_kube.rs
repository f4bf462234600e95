//! The agent process against the REAL kube-apiserver (`KUBECONFIG` + `KUBE_PEER_DIR`, see
//! ../shared/peers/README.md): `--pod-source kube` as its own ServiceAccount with exactly the
//! RBAC of `manifests/ambient-cni.yaml`, pods bound to a test node whose status the test writes
//! (there is no kubelet), netns pods (kubelet-style cgroups for the /proc scan, or the real
//! CNI chain), and the ztunnel stand-in on the ZDS socket.
//!
//! Skips without the peer's variables (or root); fails instead when `CI` is set.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::kubelet::RunningPod;
use ambient_cni_tests::peers::*;
use ambient_cni_tests::*;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::{
    ResourceRule, SelfSubjectAccessReview, SelfSubjectRulesReview,
};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Deserialize;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);
const AGENT_SA: &str = "ambient-cni";
const WORKLOAD_SA: &str = "workload";
const ANNOTATION: &str = "ambient.istio.io/redirection";
const MODE: &str = "istio.io/dataplane-mode";

/// One test's cluster objects (own namespaces, unique cluster-scoped RBAC names), removed on
/// drop, also when the test fails. All calls block on the fixture's own runtime.
struct Cluster {
    rt: tokio::runtime::Runtime,
    admin: Client,
    peer: KubePeer,
    suffix: String,
    namespaces: Vec<String>,
    /// The namespace holding the agent's ServiceAccount.
    home: String,
}

async fn client_for(kubeconfig: &Path) -> Client {
    ambient_cni_tests::peers::kube_client(kubeconfig)
        .await
        .expect("kubeconfig")
}

impl Cluster {
    fn new(peer: KubePeer, tag: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let admin = rt.block_on(client_for(&peer.kubeconfig));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let suffix = format!("{tag}-{:x}{:x}", std::process::id(), nanos & 0xfffff);
        let home = format!("ik-{suffix}-sys");
        Self {
            rt,
            admin,
            peer,
            suffix,
            namespaces: Vec::new(),
            home,
        }
    }

    fn node(&self) -> String {
        format!("node-{}", self.suffix)
    }

    fn other_node(&self) -> String {
        format!("node-{}-other", self.suffix)
    }

    fn role_name(&self) -> String {
        format!("ambient-cni-{}", self.suffix)
    }

    /// Creates namespace `ns` (with `labels`) and the workloads' ServiceAccount in it.
    fn namespace(&mut self, ns: &str, labels: Value) {
        self.namespaces.push(ns.to_owned());
        let obj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}}))
                .expect("namespace");
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": WORKLOAD_SA}})).expect("sa");
        let admin = self.admin.clone();
        self.rt.block_on(async move {
            Api::<Namespace>::all(admin.clone())
                .create(&PostParams::default(), &obj)
                .await
                .expect("create namespace");
            Api::<ServiceAccount>::namespaced(admin, ns)
                .create(&PostParams::default(), &sa)
                .await
                .expect("create workload ServiceAccount");
        });
    }

    /// Applies the shipped ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding
    /// (unique cluster-scoped names, the home namespace), then returns a kubeconfig that IS that
    /// ServiceAccount, once allowed.
    fn agent_kubeconfig(&mut self) -> std::path::PathBuf {
        let home = self.home.clone();
        self.namespace(&home, json!({}));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/ambient-cni.yaml");
        let text = std::fs::read_to_string(&path).expect("read manifests/ambient-cni.yaml");
        let role = self.role_name();
        let admin = self.admin.clone();
        let mut applied: Vec<String> = self.rt.block_on(async {
            let mut applied = Vec::new();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let mut obj = Value::deserialize(doc).expect("manifest YAML");
                let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
                match kind.as_str() {
                    "ServiceAccount" => {
                        assert_eq!(obj["metadata"]["name"], AGENT_SA);
                        obj["metadata"]["namespace"] = json!(home);
                        let sa: ServiceAccount = serde_json::from_value(obj).expect("sa");
                        Api::<ServiceAccount>::namespaced(admin.clone(), &home)
                            .create(&PostParams::default(), &sa)
                            .await
                            .expect("create agent ServiceAccount");
                    }
                    "ClusterRole" => {
                        obj["metadata"]["name"] = json!(role);
                        let r: ClusterRole = serde_json::from_value(obj).expect("role");
                        Api::<ClusterRole>::all(admin.clone())
                            .create(&PostParams::default(), &r)
                            .await
                            .expect("create ClusterRole");
                    }
                    "ClusterRoleBinding" => {
                        obj["metadata"]["name"] = json!(role);
                        obj["roleRef"]["name"] = json!(role);
                        for s in obj["subjects"].as_array_mut().into_iter().flatten() {
                            s["namespace"] = json!(home);
                        }
                        let b: ClusterRoleBinding = serde_json::from_value(obj).expect("binding");
                        Api::<ClusterRoleBinding>::all(admin.clone())
                            .create(&PostParams::default(), &b)
                            .await
                            .expect("create ClusterRoleBinding");
                    }
                    // Namespaced: the home namespace keeps their names unique.
                    "Role" => {
                        let r: Role = serde_json::from_value(obj).expect("Role");
                        Api::<Role>::namespaced(admin.clone(), &home)
                            .create(&PostParams::default(), &r)
                            .await
                            .expect("create Role");
                    }
                    "RoleBinding" => {
                        for s in obj["subjects"].as_array_mut().into_iter().flatten() {
                            s["namespace"] = json!(home);
                        }
                        let b: RoleBinding = serde_json::from_value(obj).expect("RoleBinding");
                        Api::<RoleBinding>::namespaced(admin.clone(), &home)
                            .create(&PostParams::default(), &b)
                            .await
                            .expect("create RoleBinding");
                    }
                    _ => continue,
                }
                applied.push(kind);
            }
            applied
        });
        applied.sort();
        assert_eq!(
            applied,
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ServiceAccount"
            ]
        );
        let kc = self
            .peer
            .kubeconfig_for(&home, AGENT_SA)
            .expect("kubeconfig-for");
        // The binding reaches the authorizer shortly after creation: wait until it is effective.
        let allowed = self.rt.block_on(async {
            let agent = client_for(&kc).await;
            let pods: Api<Pod> = Api::all(agent);
            let deadline = Instant::now() + LONG;
            while Instant::now() < deadline {
                if pods.list(&ListParams::default().limit(1)).await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        });
        assert!(allowed, "the agent's ServiceAccount never got its RBAC");
        kc
    }

    /// Creates a pod bound to `node` (no token mount); returns its UID.
    fn create_pod(&self, ns: &str, name: &str, node: &str) -> String {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": WORKLOAD_SA,
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "app"}]},
        }))
        .expect("pod");
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        let created = self
            .rt
            .block_on(api.create(&PostParams::default(), &p))
            .expect("create pod");
        created.metadata.uid.expect("uid")
    }

    /// Writes what a kubelet would: phase Running and the pod's IP.
    fn set_running(&self, ns: &str, name: &str, ip: &str) {
        let st = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        self.rt
            .block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&st)))
            .expect("patch pod status");
    }

    fn label_namespace(&self, ns: &str, mode: Option<&str>) {
        let patch = json!({"metadata": {"labels": {MODE: mode}}});
        let api: Api<Namespace> = Api::all(self.admin.clone());
        self.rt
            .block_on(api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("label namespace");
    }

    fn label_pod(&self, ns: &str, name: &str, mode: Option<&str>) {
        let patch = json!({"metadata": {"labels": {MODE: mode}}});
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        self.rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("label pod");
    }

    /// The pod's redirection annotation, read with the admin client.
    fn annotation(&self, ns: &str, name: &str) -> Option<String> {
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        let p = self.rt.block_on(api.get(name)).ok()?;
        p.metadata.annotations?.get(ANNOTATION).cloned()
    }

    /// Events of `reason` about pod `name`.
    fn events(&self, ns: &str, name: &str, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), ns);
        self.rt
            .block_on(api.list(&ListParams::default()))
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.involved_object.name.as_deref() == Some(name)
            })
            .collect()
    }

    /// The API server's address, from the admin kubeconfig.
    fn api_addr(&self) -> SocketAddr {
        let text = std::fs::read_to_string(&self.peer.kubeconfig).expect("admin kubeconfig");
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        let server = v["clusters"][0]["cluster"]["server"]
            .as_str()
            .expect("server")
            .to_owned();
        server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .parse()
            .expect("server is https://IP:PORT")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let namespaces = self.namespaces.clone();
        let role = self.role_name();
        self.rt.block_on(async move {
            let force = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            for ns in &namespaces {
                // A test's finalizer on its DaemonSet would hold the namespace forever.
                let _ = Api::<DaemonSet>::namespaced(admin.clone(), ns)
                    .patch(
                        DAEMONSET,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                // Pods bound to a node wait for a kubelet: force them out first.
                let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
                if let Ok(list) = api.list(&ListParams::default()).await {
                    for p in list.items {
                        let _ = api
                            .delete(p.metadata.name.as_deref().unwrap_or_default(), &force)
                            .await;
                    }
                }
                let _ = Api::<Namespace>::all(admin.clone())
                    .delete(ns, &DeleteParams::default())
                    .await;
            }
            let _ = Api::<ClusterRoleBinding>::all(admin.clone())
                .delete(&role, &DeleteParams::default())
                .await;
            let _ = Api::<ClusterRole>::all(admin)
                .delete(&role, &DeleteParams::default())
                .await;
        });
    }
}

fn inode(ns: &NamedNetns) -> u64 {
    std::fs::metadata(ns.path()).expect("netns file").ino()
}

/// Our in-pod rules in a netns (native nftables tables or iptables ISTIO_ chains).
fn rules_count(ns: &NamedNetns) -> usize {
    let nft = ns.exec(&["nft", "list", "tables"]);
    let ipt = ns.exec(&["iptables-save"]);
    String::from_utf8_lossy(&nft.stdout)
        .lines()
        .filter(|l| l.contains("istio-ambient"))
        .count()
        + String::from_utf8_lossy(&ipt.stdout)
            .lines()
            .filter(|l| l.contains("ISTIO_"))
            .count()
}

fn added(z: &Standin, uid: &str) -> Option<Value> {
    z.events_of("add").into_iter().find(|e| e["uid"] == uid)
}

fn released(z: &Standin, uid: &str) -> bool {
    z.events()
        .iter()
        .any(|e| (e["event"] == "del" || e["event"] == "drained") && e["uid"] == uid)
}

fn agent_status(dir: &Path) -> Value {
    let out = std::process::Command::new(agent_bin())
        .args(["status", "--json", "--run-dir"])
        .arg(dir.join("run"))
        .output()
        .expect("exec agent status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait(what: &str, agent: &AgentProcess, cond: impl FnMut() -> bool) {
    assert!(
        wait_for(LONG, cond),
        "timed out: {what}\n--- agent log:\n{}",
        agent.log_text()
    );
}

#[test]
fn running_pods_follow_namespace_and_pod_labels() {
    let Some(peer) = kube_peer("running_pods_follow_namespace_and_pod_labels") else {
        return;
    };
    if kubelet::cgroup2_mount().is_none() {
        assert!(std::env::var_os("CI").is_none(), "no cgroup2 hierarchy");
        eprintln!("skipped: no cgroup2 hierarchy for the /proc scan");
        return;
    }
    let mut c = Cluster::new(peer, "lbl");
    let ns = format!("ik-{}-app", c.suffix);
    c.namespace(&ns, json!({}));
    let kc = c.agent_kubeconfig();
    let (node, other) = (c.node(), c.other_node());

    // Pods as a kubelet leaves them: API object, netns with the IP, a process in its cgroup.
    let pods: Vec<(String, RunningPod)> = [("a", &node, 11), ("b", &node, 12), ("far", &other, 13)]
        .iter()
        .map(|(name, n, host)| {
            let uid = c.create_pod(&ns, name, n);
            let ip = format!("10.96.71.{host}");
            let rp = RunningPod::start(&uid, &ip);
            c.set_running(&ns, name, &ip);
            (name.to_string(), rp)
        })
        .collect();
    let [(_, a), (_, b), (_, far)] = &pods[..] else {
        unreachable!()
    };

    let dir = TempDir::new("acni-ik");
    // The drift verifier at 1 s: it must never get in the way, and reports drift as an Event.
    let agent = AgentProcess::start_kube(
        &dir.0,
        &kc,
        &node,
        &["--rules-backend", "nftables", "--verify-interval", "1"],
    );
    let z = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
    assert!(
        z.wait_count("snapshot_sent", 1, LONG),
        "{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(z.events_of("add").is_empty(), "nothing is in the mesh yet");

    // Namespace labelled: its running pods on this node join, found by the /proc scan (no CNI).
    c.label_namespace(&ns, Some("ambient"));
    wait("a and b enrolled", &agent, || {
        added(&z, &a.uid).is_some() && added(&z, &b.uid).is_some()
    });
    for (p, name) in [(a, "a"), (b, "b")] {
        let e = added(&z, &p.uid).expect("add");
        assert_eq!(
            e["netns_inode"],
            inode(&p.netns),
            "{name}: the pod's own netns"
        );
        assert_eq!(e["namespace"], ns.as_str());
        assert_eq!(e["service_account"], WORKLOAD_SA);
        assert!(rules_count(&p.netns) > 0, "{name} has rules");
        wait(&format!("{name} annotated enabled"), &agent, || {
            c.annotation(&ns, name).as_deref() == Some("enabled")
        });
    }
    // The other node's pod is not ours.
    assert!(added(&z, &far.uid).is_none());
    assert_eq!(rules_count(&far.netns), 0);
    assert_eq!(c.annotation(&ns, "far"), None);

    // Pod label `none`: released (rules out, ztunnel told, annotation gone).
    c.label_pod(&ns, "b", Some("none"));
    wait("b released", &agent, || released(&z, &b.uid));
    wait("b's rules removed", &agent, || rules_count(&b.netns) == 0);
    wait("b's annotation removed", &agent, || {
        c.annotation(&ns, "b").is_none()
    });
    assert_eq!(c.annotation(&ns, "a").as_deref(), Some("enabled"));
    assert!(rules_count(&a.netns) > 0, "a keeps its rules");

    // Namespace unlabelled: the rest leaves.
    c.label_namespace(&ns, None);
    wait("a released", &agent, || released(&z, &a.uid));
    wait("a's rules removed", &agent, || rules_count(&a.netns) == 0);
    wait("a's annotation removed", &agent, || {
        c.annotation(&ns, "a").is_none()
    });

    // No ztunnel connected: enrolment fails; the pod is pending and gets a Warning Event.
    drop(z);
    wait("no ztunnel connection", &agent, || {
        agent_status(&dir.0)["ztunnel_connections"] == 0
    });
    c.label_namespace(&ns, Some("ambient"));
    wait("a pending", &agent, || {
        c.annotation(&ns, "a").as_deref() == Some("pending")
    });
    wait("EnrollmentFailed event on a", &agent, || {
        !c.events(&ns, "a", "EnrollmentFailed").is_empty()
    });
    let ev = &c.events(&ns, "a", "EnrollmentFailed")[0];
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.involved_object.uid.as_deref(), Some(a.uid.as_str()));
    assert!(
        ev.message
            .as_deref()
            .unwrap_or_default()
            .contains("ztunnel"),
        "{:?}",
        ev.message
    );
    assert_eq!(
        ev.source.as_ref().and_then(|s| s.host.as_deref()),
        Some(node.as_str())
    );
    assert!(
        c.annotation(&ns, "b").is_none(),
        "b's own label still says none"
    );
    // ztunnel back: the pending pod is enrolled.
    let z2 = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin2.jsonl"), &[]);
    wait("a enrolled once ztunnel is back", &agent, || {
        c.annotation(&ns, "a").as_deref() == Some("enabled")
    });
    assert!(added(&z2, &a.uid).is_some());
    assert!(added(&z2, &b.uid).is_none() && added(&z2, &far.uid).is_none());

    // Drift (issue 19): nobody touched a's rules so far, so no drift Event; flushing its nat
    // table is repaired within the 1 s interval and reported as a Warning Event on a.
    assert!(c.events(&ns, "a", "AmbientCaptureDrift").is_empty());
    let out = a
        .netns
        .exec(&["nft", "flush", "table", "inet", "istio-ambient-nat"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait("AmbientCaptureDrift event on a", &agent, || {
        !c.events(&ns, "a", "AmbientCaptureDrift").is_empty()
    });
    let ev = &c.events(&ns, "a", "AmbientCaptureDrift")[0];
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.involved_object.uid.as_deref(), Some(a.uid.as_str()));
    let msg = ev.message.clone().unwrap_or_default();
    assert!(
        msg.contains("was repaired") && msg.contains("inet istio-ambient-nat"),
        "{msg}"
    );
    let nat = a
        .netns
        .exec(&["nft", "list", "table", "inet", "istio-ambient-nat"]);
    assert!(
        String::from_utf8_lossy(&nat.stdout).contains("jump istio-prerouting"),
        "a's rules are back"
    );
    assert!(
        c.events(&ns, "b", "AmbientCaptureDrift").is_empty(),
        "no Event for a pod that did not drift"
    );
    drop(agent);
}

/// The bridge chain then our plugin.
fn chain(dir: &TempDir, bridge: &HostLink, subnet: u8) -> Chain {
    Chain::bridge_then(
        "1.0.0",
        &bridge.0,
        &format!("10.99.{subnet}.0/24"),
        &dir.0,
        plugin_entry(&dir.join("plugin.sock"), 5000),
    )
}

#[test]
fn plugin_add_is_captured_and_fails_closed_while_the_api_server_is_down() {
    let test = "plugin_add_is_captured_and_fails_closed_while_the_api_server_is_down";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    let mut c = Cluster::new(peer, "add");
    let mesh = format!("ik-{}-mesh", c.suffix);
    let plain = format!("ik-{}-plain", c.suffix);
    c.namespace(&mesh, json!({MODE: "ambient"}));
    c.namespace(&plain, json!({}));
    let kc = c.agent_kubeconfig();
    let node = c.node();

    // The agent reaches the API server through a gate the test can close.
    let dir = TempDir::new("acni-ika");
    let gate = TcpGate::open(c.api_addr());
    let gated = dir.join("agent.kubeconfig");
    kubeconfig_via(&kc, &format!("https://{}", gate.addr()), &gated).expect("gated kubeconfig");
    let agent = AgentProcess::start_kube(&dir.0, &gated, &node, &["--rules-backend", "iptables"]);
    let z = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
    assert!(
        z.wait_count("snapshot_sent", 1, LONG),
        "{}",
        agent.log_text()
    );
    let bridge = HostLink(unique("acbr"));
    let chain = chain(&dir, &bridge, 71);

    // A new pod (no status yet: the kubelet runs CNI before it has an IP) in a labelled namespace.
    let uid = c.create_pod(&mesh, "web", &node);
    let web = NamedNetns::new();
    let att = Attachment::pod(&web.path(), &mesh, "web", &uid);
    let res = chain
        .add(&att)
        .unwrap_or_else(|(i, e)| panic!("ADD plugin {i}: {e:?}\n{}", agent.log_text()));
    assert_eq!(res[1], res[0]);
    let e = added(&z, &uid).expect("ztunnel got the pod");
    assert_eq!(e["netns_inode"], inode(&web));
    assert_eq!(e["service_account"], WORKLOAD_SA);
    assert!(rules_count(&web) > 0);
    wait("web annotated enabled", &agent, || {
        c.annotation(&mesh, "web").as_deref() == Some("enabled")
    });

    // Unlabelled namespace: not in the mesh.
    let puid = c.create_pod(&plain, "db", &node);
    let db = NamedNetns::new();
    let patt = Attachment::pod(&db.path(), &plain, "db", &puid);
    chain
        .add(&patt)
        .unwrap_or_else(|(i, e)| panic!("ADD plugin {i}: {e:?}"));
    assert_eq!(rules_count(&db), 0);
    assert!(added(&z, &puid).is_none());

    // API server unreachable, and a pod the agent has not seen: the ADD fails closed (11).
    gate.off();
    let luid = c.create_pod(&mesh, "late", &node);
    let late = NamedNetns::new();
    let latt = Attachment::pod(&late.path(), &mesh, "late", &luid);
    let (idx, exec) = chain
        .add(&latt)
        .expect_err("API server down: the ADD of an unknown pod must fail");
    assert_eq!(idx, 1, "our plugin failed, not the bridge");
    let v = exec.assert_error(11);
    eprintln!("ADD with the API server down: {:?}: {v}", exec.elapsed);
    assert!(exec.elapsed < Duration::from_secs(6), "{:?}", exec.elapsed);
    assert!(added(&z, &luid).is_none());
    assert_eq!(rules_count(&late), 0, "nothing half-applied");
    // The runtime tears the failed sandbox down (DEL never fails), then retries.
    chain.del(&latt, None).expect("DEL");

    // Back: the kubelet's retry succeeds.
    gate.on();
    let back = Instant::now();
    let mut attempts = 0;
    let res = loop {
        attempts += 1;
        match chain.add(&latt) {
            Ok(r) => break r,
            Err((i, e)) => {
                assert!(
                    back.elapsed() < LONG,
                    "retry never succeeded: plugin {i}: {e:?}\n{}",
                    agent.log_text()
                );
                assert_eq!(i, 1, "{e:?}");
                e.assert_error(11);
                chain.del(&latt, None).expect("DEL");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    eprintln!(
        "ADD succeeded {:?} after the API server came back ({attempts} attempt(s))",
        back.elapsed()
    );
    assert_eq!(res[1], res[0]);
    let e = added(&z, &luid).expect("ztunnel got the late pod");
    assert_eq!(e["netns_inode"], inode(&late));
    assert!(rules_count(&late) > 0);
    wait("late annotated enabled", &agent, || {
        c.annotation(&mesh, "late").as_deref() == Some("enabled")
    });
    chain.del(&att, Some(&res[1])).expect("DEL web");
    drop(agent);
}

/// Where an access is asked: in the test's workload namespace, or cluster-wide (all
/// namespaces for a namespaced resource; the only scope of a cluster-scoped one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Ns,
    All,
}

/// One access: (verb, API group, resource, subresource, scope).
type Access = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Scope,
);

/// What docs/contract.md ("Kubernetes": "minimal RBAC: pods/namespaces get/list/watch,
/// pods/status patch, events create") grants the agent, as (verb, group, resource) rules;
/// events in both groups that serve them (core and `events.k8s.io`).
const CONTRACT_RULES: &[(&str, &str, &str)] = &[
    ("get", "", "pods"),
    ("list", "", "pods"),
    ("watch", "", "pods"),
    ("get", "", "namespaces"),
    ("list", "", "namespaces"),
    ("watch", "", "namespaces"),
    ("patch", "", "pods/status"),
    ("create", "", "events"),
    ("create", "events.k8s.io", "events"),
];

/// What every authenticated user may do (the `system:basic-user` ClusterRole): ask these
/// very questions.
const BASIC_USER_RULES: &[(&str, &str, &str)] = &[
    ("create", "authorization.k8s.io", "selfsubjectaccessreviews"),
    ("create", "authorization.k8s.io", "selfsubjectrulesreviews"),
];

/// Every access the contract lists, where the agent uses it (the pod watch is cluster-wide
/// with a node field selector; status patches and events are in the pod's namespace).
const MUST_ALLOW: &[Access] = &[
    ("get", "", "pods", "", Scope::Ns),
    ("list", "", "pods", "", Scope::Ns),
    ("watch", "", "pods", "", Scope::Ns),
    ("get", "", "pods", "", Scope::All),
    ("list", "", "pods", "", Scope::All),
    ("watch", "", "pods", "", Scope::All),
    ("get", "", "namespaces", "", Scope::All),
    ("list", "", "namespaces", "", Scope::All),
    ("watch", "", "namespaces", "", Scope::All),
    ("patch", "", "pods", "status", Scope::Ns),
    ("patch", "", "pods", "status", Scope::All),
    ("create", "", "events", "", Scope::Ns),
    ("create", "events.k8s.io", "events", "", Scope::Ns),
];

/// What a node agent must not be able to do: other verbs on the same resources, other
/// subresources, other resources a node agent might be tempted to read, escalation paths.
const MUST_DENY: &[Access] = &[
    // Pods: read and status-patch only.
    ("create", "", "pods", "", Scope::Ns),
    ("update", "", "pods", "", Scope::Ns),
    ("patch", "", "pods", "", Scope::Ns),
    ("patch", "", "pods", "", Scope::All),
    ("delete", "", "pods", "", Scope::Ns),
    ("deletecollection", "", "pods", "", Scope::Ns),
    ("update", "", "pods", "status", Scope::Ns),
    ("get", "", "pods", "log", Scope::Ns),
    ("create", "", "pods", "exec", Scope::Ns),
    ("create", "", "pods", "attach", Scope::Ns),
    ("create", "", "pods", "portforward", Scope::Ns),
    ("create", "", "pods", "eviction", Scope::Ns),
    ("create", "", "pods", "binding", Scope::Ns),
    ("patch", "", "pods", "ephemeralcontainers", Scope::Ns),
    // Namespaces: read only.
    ("create", "", "namespaces", "", Scope::All),
    ("update", "", "namespaces", "", Scope::All),
    ("patch", "", "namespaces", "", Scope::All),
    ("delete", "", "namespaces", "", Scope::All),
    ("patch", "", "namespaces", "status", Scope::All),
    ("update", "", "namespaces", "finalize", Scope::All),
    // Events: create only.
    ("get", "", "events", "", Scope::Ns),
    ("list", "", "events", "", Scope::All),
    ("watch", "", "events", "", Scope::All),
    ("update", "", "events", "", Scope::Ns),
    ("patch", "", "events", "", Scope::Ns),
    ("delete", "", "events", "", Scope::Ns),
    ("list", "events.k8s.io", "events", "", Scope::Ns),
    ("patch", "events.k8s.io", "events", "", Scope::Ns),
    // Secrets, configmaps, service accounts and their tokens.
    ("get", "", "secrets", "", Scope::Ns),
    ("list", "", "secrets", "", Scope::Ns),
    ("list", "", "secrets", "", Scope::All),
    ("watch", "", "secrets", "", Scope::All),
    ("get", "", "configmaps", "", Scope::Ns),
    ("list", "", "configmaps", "", Scope::All),
    ("update", "", "configmaps", "", Scope::Ns),
    ("patch", "", "configmaps", "", Scope::Ns),
    ("create", "", "configmaps", "", Scope::Ns),
    ("get", "", "serviceaccounts", "", Scope::Ns),
    ("create", "", "serviceaccounts", "token", Scope::Ns),
    // Nodes: not in the contract (the agent knows its node from NODE_NAME).
    ("get", "", "nodes", "", Scope::All),
    ("list", "", "nodes", "", Scope::All),
    ("watch", "", "nodes", "", Scope::All),
    ("patch", "", "nodes", "", Scope::All),
    ("patch", "", "nodes", "status", Scope::All),
    ("get", "", "nodes", "proxy", Scope::All),
    // Other workloads and networking objects.
    ("get", "", "services", "", Scope::Ns),
    ("list", "", "endpoints", "", Scope::All),
    ("list", "discovery.k8s.io", "endpointslices", "", Scope::All),
    ("get", "apps", "daemonsets", "", Scope::Ns),
    ("list", "apps", "daemonsets", "", Scope::All),
    ("patch", "apps", "deployments", "", Scope::Ns),
    (
        "list",
        "networking.k8s.io",
        "networkpolicies",
        "",
        Scope::All,
    ),
    ("get", "coordination.k8s.io", "leases", "", Scope::Ns),
    ("create", "coordination.k8s.io", "leases", "", Scope::Ns),
    ("update", "coordination.k8s.io", "leases", "", Scope::Ns),
    // Escalation.
    (
        "create",
        "rbac.authorization.k8s.io",
        "clusterroles",
        "",
        Scope::All,
    ),
    (
        "escalate",
        "rbac.authorization.k8s.io",
        "clusterroles",
        "",
        Scope::All,
    ),
    (
        "bind",
        "rbac.authorization.k8s.io",
        "clusterroles",
        "",
        Scope::All,
    ),
    (
        "create",
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "",
        Scope::All,
    ),
    (
        "create",
        "rbac.authorization.k8s.io",
        "rolebindings",
        "",
        Scope::Ns,
    ),
    ("impersonate", "", "users", "", Scope::All),
    ("impersonate", "", "serviceaccounts", "", Scope::Ns),
    ("impersonate", "", "groups", "", Scope::All),
    (
        "create",
        "authentication.k8s.io",
        "tokenreviews",
        "",
        Scope::All,
    ),
    (
        "create",
        "authorization.k8s.io",
        "subjectaccessreviews",
        "",
        Scope::All,
    ),
    ("approve", "certificates.k8s.io", "signers", "", Scope::All),
    (
        "create",
        "certificates.k8s.io",
        "certificatesigningrequests",
        "",
        Scope::All,
    ),
    ("*", "*", "*", "", Scope::All),
    ("*", "", "pods", "", Scope::Ns),
];

/// `SelfSubjectAccessReview`: (allowed, reason) for `a` as the client's own identity.
async fn can_i(client: &Client, ns: &str, a: Access) -> (bool, String) {
    let (verb, group, resource, sub, scope) = a;
    let mut attrs = json!({"verb": verb, "group": group, "resource": resource});
    if !sub.is_empty() {
        attrs["subresource"] = json!(sub);
    }
    if scope == Scope::Ns {
        attrs["namespace"] = json!(ns);
    }
    let review: SelfSubjectAccessReview =
        serde_json::from_value(json!({"spec": {"resourceAttributes": attrs}})).expect("review");
    let got = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap_or_else(|e| panic!("SelfSubjectAccessReview {a:?}: {e}"));
    let st = got.status.unwrap_or_default();
    let why = format!(
        "reason={:?} evaluationError={:?}",
        st.reason, st.evaluation_error
    );
    (st.allowed, why)
}

/// `kubectl` when there is one: `$KUBE_PEER_DIR/kubectl`, the peer's `bin/`, else `PATH`.
fn find_kubectl(peer: &KubePeer) -> Option<std::path::PathBuf> {
    let mut candidates = vec![peer.dir.join("kubectl")];
    if let Some(kube) = peer.dir.parent().and_then(Path::parent) {
        candidates.push(kube.join("bin/kubectl"));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        candidates.push(dir.join("kubectl"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// `kubectl auth can-i` for `a`: `Some(yes)`, or `None` when kubectl answered neither.
fn kubectl_can_i(kubectl: &Path, kc: &Path, cache: &Path, ns: &str, a: Access) -> Option<bool> {
    let (verb, group, resource, sub, scope) = a;
    let what = if group.is_empty() || (group == "*" && resource == "*") {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    };
    let mut cmd = std::process::Command::new(kubectl);
    cmd.arg("--kubeconfig")
        .arg(kc)
        .arg("--cache-dir")
        .arg(cache)
        .args(["auth", "can-i", verb, &what]);
    if !sub.is_empty() {
        cmd.arg(format!("--subresource={sub}"));
    }
    match scope {
        Scope::Ns => cmd.args(["-n", ns]),
        Scope::All => cmd.arg("--all-namespaces"),
    };
    let out = cmd.output().ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Some(true),
        "no" => Some(false),
        other => {
            eprintln!(
                "kubectl auth can-i {verb} {what}: {other:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            None
        }
    }
}

/// (verb, group, resource) of every resource rule that applies in the reviewed namespace.
fn expand(rules: &[ResourceRule]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for r in rules {
        assert!(
            r.resource_names.as_ref().is_none_or(|n| n.is_empty()),
            "a rule limited to names: {r:?}"
        );
        for v in &r.verbs {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    out.push((v.clone(), g.clone(), res.clone()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn agent_service_account_can_do_exactly_what_the_contract_lists() {
    let test = "agent_service_account_can_do_exactly_what_the_contract_lists";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    let started = Instant::now();
    let mut c = Cluster::new(peer.clone(), "rbac");
    let ns = format!("ik-{}-app", c.suffix);
    c.namespace(&ns, json!({}));
    let kc = c.agent_kubeconfig();
    let agent = c.rt.block_on(client_for(&kc));

    // Who we are: the ServiceAccount, not the admin (a test that asks as admin proves nothing).
    let whoami = c.rt.block_on(async {
        let sar: SelfSubjectAccessReview = serde_json::from_value(json!({"spec": {
            "resourceAttributes": {"verb": "get", "resource": "secrets", "namespace": ns}}}))
        .expect("review");
        Api::<SelfSubjectAccessReview>::all(agent.clone())
            .create(&PostParams::default(), &sar)
            .await
            .expect("SelfSubjectAccessReview")
    });
    assert_eq!(
        whoami.status.map(|s| s.allowed),
        Some(false),
        "this client is not the agent's ServiceAccount (it may read secrets)"
    );

    // `kubectl auth can-i --list`: every resource rule that applies in the namespace.
    let rules = c.rt.block_on(async {
        let review: SelfSubjectRulesReview =
            serde_json::from_value(json!({"spec": {"namespace": ns}})).expect("rules review");
        Api::<SelfSubjectRulesReview>::all(agent.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("SelfSubjectRulesReview")
    });
    let status = rules.status.expect("SelfSubjectRulesReview status");
    assert!(
        !status.incomplete,
        "the rules review is incomplete: {:?}",
        status.evaluation_error
    );
    let got = expand(&status.resource_rules);
    let mut want: Vec<(String, String, String)> = CONTRACT_RULES
        .iter()
        .chain(BASIC_USER_RULES)
        .map(|(v, g, r)| (v.to_string(), g.to_string(), r.to_string()))
        .collect();
    want.sort();
    let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).collect();
    let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the shipped RBAC (manifests/ambient-cni.yaml) is not the contract's \
         (docs/contract.md \"minimal RBAC\"):\n  granted beyond the contract: {extra:?}\n  \
         listed by the contract but not granted: {missing:?}\n  all rules: {:#?}",
        status.resource_rules
    );

    // Each access, asked one by one (a rules review lists; the authorizer decides).
    let answers: Vec<(Access, bool, String)> = c.rt.block_on(async {
        let mut out = Vec::new();
        for a in MUST_ALLOW.iter().chain(MUST_DENY) {
            let (ok, why) = can_i(&agent, &ns, *a).await;
            out.push((*a, ok, why));
        }
        out
    });
    let wrong: Vec<String> = answers
        .iter()
        .filter(|(a, ok, _)| *ok != MUST_ALLOW.contains(a))
        .map(|(a, ok, why)| {
            let want = if *ok { "denied" } else { "allowed" };
            format!("{a:?}: must be {want} ({why})")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the agent's ServiceAccount has the wrong access:\n  {}",
        wrong.join("\n  ")
    );

    // The answers hold for real requests too.
    c.rt.block_on(async {
        let pods: Api<Pod> = Api::all(agent.clone());
        pods.list(&ListParams::default().limit(1))
            .await
            .expect("list pods as the agent");
        let secrets: Api<Secret> = Api::namespaced(agent.clone(), &ns);
        match secrets.list(&ListParams::default()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403, "list secrets as the agent: {s:?}")
            }
            other => panic!("list secrets as the agent must be forbidden: {other:?}"),
        }
        let own: Api<Pod> = Api::namespaced(agent.clone(), &ns);
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "forbidden"},
            "spec": {"serviceAccountName": WORKLOAD_SA, "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "app"}]},
        }))
        .expect("pod");
        match own.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "create pod as the agent: {s:?}"),
            other => panic!("create pod as the agent must be forbidden: {other:?}"),
        }
    });

    // The agent's own namespace adds exactly one rule: `get` on its own DaemonSet, by name
    // (read at SIGTERM: upgrade or uninstall).
    let home = c.home.clone();
    let home_rules = c.rt.block_on(async {
        let review: SelfSubjectRulesReview =
            serde_json::from_value(json!({"spec": {"namespace": home}})).expect("rules review");
        Api::<SelfSubjectRulesReview>::all(agent.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("SelfSubjectRulesReview")
    });
    let home_status = home_rules.status.expect("SelfSubjectRulesReview status");
    let (named, unnamed): (Vec<ResourceRule>, Vec<ResourceRule>) = home_status
        .resource_rules
        .into_iter()
        .partition(|r| r.resource_names.as_ref().is_some_and(|n| !n.is_empty()));
    assert_eq!(
        expand(&unnamed),
        got,
        "the home namespace grants more than the contract"
    );
    let named: Vec<Value> = named
        .iter()
        .map(|r| json!([r.verbs, r.api_groups, r.resources, r.resource_names]))
        .collect();
    assert_eq!(
        named,
        [json!([
            ["get"],
            ["apps"],
            ["daemonsets"],
            ["ambient-cni-node"]
        ])],
        "the named rules of the agent's own namespace"
    );
    let by_name = c.rt.block_on(async {
        let mut wrong = Vec::new();
        for (verb, where_, name, allowed) in [
            ("get", &home, Some("ambient-cni-node"), true),
            ("get", &home, Some("other"), false),
            ("get", &home, None, false),
            ("list", &home, None, false),
            ("watch", &home, None, false),
            ("update", &home, Some("ambient-cni-node"), false),
            ("patch", &home, Some("ambient-cni-node"), false),
            ("delete", &home, Some("ambient-cni-node"), false),
            ("get", &ns, Some("ambient-cni-node"), false),
        ] {
            let mut attrs = json!({"verb": verb, "group": "apps", "resource": "daemonsets",
                "namespace": where_});
            if let Some(n) = name {
                attrs["name"] = json!(n);
            }
            let review: SelfSubjectAccessReview =
                serde_json::from_value(json!({"spec": {"resourceAttributes": attrs}}))
                    .expect("review");
            let got = Api::<SelfSubjectAccessReview>::all(agent.clone())
                .create(&PostParams::default(), &review)
                .await
                .expect("SelfSubjectAccessReview");
            if got.status.map(|s| s.allowed) != Some(allowed) {
                wrong.push(format!(
                    "{verb} daemonsets/{name:?} in {where_}: must be allowed={allowed}"
                ));
            }
        }
        // For real: our (absent) DaemonSet is a 404, not a 403; another name is a 403.
        let dss: Api<DaemonSet> = Api::namespaced(agent.clone(), &home);
        match dss.get_opt("ambient-cni-node").await {
            Ok(None) => {}
            other => wrong.push(format!("get our DaemonSet as the agent: {other:?}")),
        }
        match dss.get("other").await {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => wrong.push(format!("get another DaemonSet as the agent: {other:?}")),
        }
        wrong
    });
    assert!(
        by_name.is_empty(),
        "the agent's DaemonSet access is wrong:\n  {}",
        by_name.join("\n  ")
    );

    // The same table through kubectl, when this machine has it.
    match find_kubectl(&peer) {
        None => eprintln!("no kubectl (PATH, KUBE_PEER_DIR): the kubectl cross-check is skipped"),
        Some(kubectl) => {
            let cache = TempDir::new("acni-kubectl");
            let mut disagree = Vec::new();
            let mut unanswered = 0;
            for (a, ok, _) in &answers {
                match kubectl_can_i(&kubectl, &kc, &cache.0, &ns, *a) {
                    Some(yes) if yes != *ok => disagree.push(format!("{a:?}: kubectl says {yes}")),
                    Some(_) => {}
                    None => unanswered += 1,
                }
            }
            assert!(
                disagree.is_empty(),
                "{} auth can-i disagrees with the access reviews:\n  {}",
                kubectl.display(),
                disagree.join("\n  ")
            );
            assert!(
                unanswered < answers.len(),
                "{} never answered yes/no",
                kubectl.display()
            );
            eprintln!(
                "kubectl ({}) agrees on {} of {} accesses",
                kubectl.display(),
                answers.len() - unanswered,
                answers.len()
            );
        }
    }
    eprintln!(
        "{} rules, {} allowed and {} denied accesses checked in {:?}",
        got.len(),
        MUST_ALLOW.len(),
        MUST_DENY.len(),
        started.elapsed()
    );
}

/// How many times the agent logged its (pod, namespace) watch failing.
fn watch_failures(agent: &AgentProcess) -> (usize, usize) {
    let log = agent.log_text();
    (
        log.matches("pod watch failed").count(),
        log.matches("namespace watch failed").count(),
    )
}

/// Closes `gate` and waits until both of the agent's watches have noticed (their live
/// connections are cut, so nothing can reach the agent any more).
fn api_server_down(gate: &TcpGate, agent: &AgentProcess) {
    let (pods, nss) = watch_failures(agent);
    gate.off();
    wait("both watches see the API server gone", agent, || {
        let (p, n) = watch_failures(agent);
        p > pods && n > nss
    });
}

#[test]
fn agent_watch_resumes_after_the_api_server_drops_and_misses_no_change() {
    let test = "agent_watch_resumes_after_the_api_server_drops_and_misses_no_change";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    if kubelet::cgroup2_mount().is_none() {
        assert!(std::env::var_os("CI").is_none(), "no cgroup2 hierarchy");
        eprintln!("skipped: no cgroup2 hierarchy for the /proc scan");
        return;
    }
    let mut c = Cluster::new(peer, "drop");
    let ns = format!("ik-{}-app", c.suffix);
    c.namespace(&ns, json!({}));
    let kc = c.agent_kubeconfig();
    let node = c.node();

    // A running pod (as a kubelet leaves it) in a namespace that is not in the mesh.
    let uid = c.create_pod(&ns, "web", &node);
    let web = RunningPod::start(&uid, "10.96.72.11");
    c.set_running(&ns, "web", &web.ip);

    // The agent reaches the API server through a gate the test can close.
    let dir = TempDir::new("acni-ikw");
    let gate = TcpGate::open(c.api_addr());
    let gated = dir.join("agent.kubeconfig");
    kubeconfig_via(&kc, &format!("https://{}", gate.addr()), &gated).expect("gated kubeconfig");
    let agent = AgentProcess::start_kube(&dir.0, &gated, &node, &["--rules-backend", "iptables"]);
    let z = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
    assert!(
        z.wait_count("snapshot_sent", 1, LONG),
        "{}",
        agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(z.events_of("add").is_empty(), "nothing is in the mesh yet");
    assert_eq!(rules_count(&web.netns), 0);

    // Outage 1 (an API server restart): the namespace is labelled and a second pod starts
    // while the agent cannot see either.
    api_server_down(&gate, &agent);
    c.label_namespace(&ns, Some("ambient"));
    let luid = c.create_pod(&ns, "late", &node);
    let late = RunningPod::start(&luid, "10.96.72.12");
    c.set_running(&ns, "late", &late.ip);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        added(&z, &uid).is_none() && added(&z, &luid).is_none(),
        "the agent acted while the gate was closed: the test's premise is broken\n{}",
        agent.log_text()
    );
    assert_eq!(rules_count(&web.netns), 0);

    // Back: the resumed watches deliver both changes; both pods join without any CNI call.
    gate.on();
    let back = Instant::now();
    wait(
        "web and late enrolled after the watch resumed",
        &agent,
        || added(&z, &uid).is_some() && added(&z, &luid).is_some(),
    );
    eprintln!(
        "outage 1: both pods enrolled {:?} after the API server came back",
        back.elapsed()
    );
    for (p, name) in [(&web, "web"), (&late, "late")] {
        let e = added(&z, &p.uid).expect("add");
        assert_eq!(
            e["netns_inode"],
            inode(&p.netns),
            "{name}: the pod's own netns"
        );
        assert_eq!(e["namespace"], ns.as_str());
        assert_eq!(e["service_account"], WORKLOAD_SA);
        assert!(rules_count(&p.netns) > 0, "{name} has rules");
        wait(&format!("{name} annotated enabled"), &agent, || {
            c.annotation(&ns, name).as_deref() == Some("enabled")
        });
    }
    assert_eq!(
        z.events_of("add").len(),
        2,
        "one AddWorkload per pod: {:?}",
        z.events_of("add")
    );

    // Outage 2: the label goes away while the agent cannot see it.
    api_server_down(&gate, &agent);
    c.label_namespace(&ns, None);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !released(&z, &uid) && !released(&z, &luid),
        "released while the gate was closed: the test's premise is broken"
    );
    assert!(rules_count(&web.netns) > 0);

    // Back: both pods are released (ztunnel told, rules out, annotation gone).
    gate.on();
    let back = Instant::now();
    wait(
        "web and late released after the watch resumed",
        &agent,
        || released(&z, &uid) && released(&z, &luid),
    );
    eprintln!(
        "outage 2: both pods released {:?} after the API server came back",
        back.elapsed()
    );
    for (p, name) in [(&web, "web"), (&late, "late")] {
        wait(&format!("{name}'s rules removed"), &agent, || {
            rules_count(&p.netns) == 0
        });
        wait(&format!("{name}'s annotation removed"), &agent, || {
            c.annotation(&ns, name).is_none()
        });
    }
    drop(agent);
}

/// The agent's DaemonSet as the chart names it (the agent reads it at SIGTERM).
const DAEMONSET: &str = "ambient-cni-node";

impl Cluster {
    /// Creates our DaemonSet in the home namespace; it selects no node, so it only sits there.
    fn create_daemonset(&self) {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": DAEMONSET},
            "spec": {
                "selector": {"matchLabels": {"app": "acni-test"}},
                "template": {
                    "metadata": {"labels": {"app": "acni-test"}},
                    "spec": {"nodeSelector": {"ambient-cni.test/no-node": "true"},
                        "automountServiceAccountToken": false,
                        "containers": [{"name": "agent", "image": "agent"}]},
                },
            },
        }))
        .expect("DaemonSet");
        let api: Api<DaemonSet> = Api::namespaced(self.admin.clone(), &self.home);
        self.rt
            .block_on(api.create(&PostParams::default(), &ds))
            .expect("create DaemonSet");
    }

    /// Sets (`Some`) or clears (`None`) a finalizer on our DaemonSet.
    fn daemonset_finalizer(&self, finalizer: Option<&str>) {
        let patch = json!({"metadata": {"finalizers": finalizer.map(|f| vec![f])}});
        let api: Api<DaemonSet> = Api::namespaced(self.admin.clone(), &self.home);
        self.rt
            .block_on(api.patch(DAEMONSET, &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("patch DaemonSet finalizers");
    }

    /// Deletes our DaemonSet (with a finalizer on it, it stays, marked for deletion).
    fn delete_daemonset(&self) {
        let api: Api<DaemonSet> = Api::namespaced(self.admin.clone(), &self.home);
        self.rt
            .block_on(api.delete(DAEMONSET, &DeleteParams::default()))
            .expect("delete DaemonSet");
    }

    /// Whether our DaemonSet exists, and whether it is marked for deletion.
    fn daemonset_state(&self) -> Option<bool> {
        let api: Api<DaemonSet> = Api::namespaced(self.admin.clone(), &self.home);
        let ds = self
            .rt
            .block_on(api.get_opt(DAEMONSET))
            .expect("get DaemonSet")?;
        Some(ds.metadata.deletion_timestamp.is_some())
    }
}

/// Whether the plugin is installed in `dir`: its binary in `bin/`, its entry in the conflist.
fn installed(dir: &TempDir) -> (bool, bool) {
    let conf = std::fs::read_to_string(dir.join("net.d/10-k8s.conflist")).unwrap_or_default();
    (
        dir.join("bin/ambient-cni").is_file(),
        conf.contains("\"ambient-cni\""),
    )
}

#[test]
fn sigterm_keeps_the_plugin_while_our_daemonset_exists_and_removes_it_on_uninstall() {
    let test = "sigterm_keeps_the_plugin_while_our_daemonset_exists_and_removes_it_on_uninstall";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    let mut c = Cluster::new(peer, "stop");
    let kc = c.agent_kubeconfig();
    let node = c.node();
    let home = c.home.clone();
    let dir = TempDir::new("acni-iks");
    for d in ["net.d", "bin", "proc"] {
        std::fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    let primary = json!({"cniVersion": "1.0.0", "name": "k8s",
        "plugins": [{"type": "bridge", "bridge": "none0"}]});
    std::fs::write(dir.join("net.d/10-k8s.conflist"), primary.to_string()).expect("conflist");
    // Through a gate, so one round can take the API server away.
    let gate = TcpGate::open(c.api_addr());
    let gated = dir.join("agent.kubeconfig");
    kubeconfig_via(&kc, &format!("https://{}", gate.addr()), &gated).expect("gated kubeconfig");
    let (bin_dir, conf_dir, proc_dir) = (
        dir.join("bin").display().to_string(),
        dir.join("net.d").display().to_string(),
        dir.join("proc").display().to_string(),
    );
    let plugin = plugin_bin().display().to_string();
    let start = |round: &str| {
        let agent = AgentProcess::start_kube(
            &dir.join(round),
            &gated,
            &node,
            &[
                "--install-cni=true",
                "--cni-bin-dir",
                &bin_dir,
                "--cni-conf-dir",
                &conf_dir,
                "--plugin-binary",
                &plugin,
                "--pod-namespace",
                &home,
                "--daemonset-name",
                DAEMONSET,
                // An empty /proc: no kubelet found, so the host's probe table is never touched.
                "--host-proc",
                &proc_dir,
            ],
        );
        wait(&format!("{round}: plugin installed"), &agent, || {
            installed(&dir) == (true, true)
        });
        agent
    };
    let stop = |mut agent: AgentProcess, round: &str| -> String {
        let t = Instant::now();
        let st = agent.terminate(Duration::from_secs(15));
        assert!(
            st.is_some(),
            "{round}: the agent did not exit within 15 s of SIGTERM\n{}",
            agent.log_text()
        );
        eprintln!("{round}: exited {:?} after SIGTERM", t.elapsed());
        agent.log_text()
    };

    // Upgrade: our DaemonSet is there, so the plugin and its entry stay.
    c.create_daemonset();
    let log = stop(start("upgrade"), "upgrade");
    assert_eq!(
        installed(&dir),
        (true, true),
        "upgrade: the plugin must stay\n{log}"
    );
    assert!(log.contains("leaving the plugin installed"), "{log}");

    // The API server cannot be reached at SIGTERM: treated as an uninstall (see
    // docs/operations.md: a left-behind entry breaks every later pod on the node).
    let agent = start("unreachable");
    gate.off();
    let log = stop(agent, "unreachable");
    gate.on();
    assert_eq!(
        installed(&dir),
        (false, false),
        "API unreachable: the plugin must be removed\n{log}"
    );
    assert!(log.contains("treating this as an uninstall"), "{log}");

    // Uninstall, DaemonSet being deleted (a finalizer holds it, marked for deletion).
    c.daemonset_finalizer(Some("ambient-cni.test/hold"));
    let agent = start("deleting");
    c.delete_daemonset();
    assert_eq!(
        c.daemonset_state(),
        Some(true),
        "the DaemonSet is marked for deletion"
    );
    let log = stop(agent, "deleting");
    assert_eq!(
        installed(&dir),
        (false, false),
        "DaemonSet being deleted: the plugin must be removed\n{log}"
    );
    let conf = std::fs::read_to_string(dir.join("net.d/10-k8s.conflist")).expect("conflist");
    let v: Value = serde_json::from_str(&conf).expect("conflist JSON");
    assert_eq!(v, primary, "the primary's config is as it was before us");

    // Uninstall, DaemonSet gone.
    c.daemonset_finalizer(None);
    assert!(
        wait_for(LONG, || c.daemonset_state().is_none()),
        "DaemonSet still there"
    );
    let log = stop(start("gone"), "gone");
    assert_eq!(
        installed(&dir),
        (false, false),
        "DaemonSet gone: the plugin must be removed\n{log}"
    );
    assert!(
        log.contains("our DaemonSet is gone or being deleted"),
        "{log}"
    );
}

/// [`injected_pod`] on `node`, run as the workload service account without its token.
fn injected_here(namespace: &str, name: &str, node: &str) -> serde_json::Value {
    let mut p = injected_pod(namespace, name);
    p["spec"]["nodeName"] = node.into();
    p["spec"]["serviceAccountName"] = WORKLOAD_SA.into();
    p["spec"]["automountServiceAccountToken"] = false.into();
    p
}

/// Sidecar mode (issue 20): a sidecar-injected pod whose annotation Istio would refuse fails
/// its ADD with a CNI error naming the key, and the agent records a Warning Event on the pod
/// (what `kubectl describe pod` shows), nothing installed.
#[test]
fn sidecar_pod_with_a_bad_annotation_fails_its_add_and_gets_a_warning_event() {
    let test = "sidecar_pod_with_a_bad_annotation_fails_its_add_and_gets_a_warning_event";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    let mut c = Cluster::new(peer, "sc");
    let shop = format!("ik-{}-shop", c.suffix);
    c.namespace(&shop, json!({}));
    let kc = c.agent_kubeconfig();
    let node = c.node();
    let dir = TempDir::new("acni-iksc");
    let agent = AgentProcess::start_kube(&dir.0, &kc, &node, &["--rules-backend", "iptables"]);
    let key = "traffic.sidecar.istio.io/includeInboundPorts";
    let mut p = injected_here(&shop, "reviews", &node);
    p["metadata"]["annotations"][key] = "80,x".into();
    let p: Pod = serde_json::from_value(p).expect("pod");
    let api: Api<Pod> = Api::namespaced(c.admin.clone(), &shop);
    let uid =
        c.rt.block_on(api.create(&PostParams::default(), &p))
            .expect("create pod")
            .metadata
            .uid
            .expect("uid");
    let bridge = HostLink(unique("acbr"));
    let chain = chain(&dir, &bridge, 73);
    let pod_ns = NamedNetns::new();
    let att = Attachment::pod(&pod_ns.path(), &shop, "reviews", &uid);
    let Err((idx, exec)) = chain.add(&att) else {
        panic!(
            "a refused annotation must fail the ADD\n{}",
            agent.log_text()
        );
    };
    assert_eq!(idx, 1, "our plugin failed, not the bridge: {exec:?}");
    let v = exec.assert_error(100);
    let msg = v["msg"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains(key) && msg.contains("80,x"), "{msg}");
    assert_eq!(rules_count(&pod_ns), 0);
    assert!(!pod_ns
        .exec(&["iptables-save"])
        .stdout
        .windows(6)
        .any(|w| w == b"ISTIO_"));
    wait("the Warning Event on the pod", &agent, || {
        !c.events(&shop, "reviews", "SidecarRedirectionInvalid")
            .is_empty()
    });
    let e = &c.events(&shop, "reviews", "SidecarRedirectionInvalid")[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let text = e.message.as_deref().unwrap_or_default();
    assert!(text.contains(key) && text.contains("80,x"), "{text}");
    chain.del(&att, None).expect("DEL");
    drop(agent);
}

/// Istio's two other repair modes against the real API server: a sidecar pod whose
/// `istio-validation` ended with 126 is labelled `cni.istio.io/uninitialized=true`
/// (`REPAIR_LABEL_PODS`), or deleted (`REPAIR_DELETE_PODS`, with the delete grant the chart
/// adds only in that mode), each once, with Istio's Event reason.
#[test]
fn sidecar_repair_label_and_delete_modes_act_on_a_broken_pod() {
    let test = "sidecar_repair_label_and_delete_modes_act_on_a_broken_pod";
    let Some(peer) = kube_peer(test) else {
        return;
    };
    let mut c = Cluster::new(peer, "rp");
    let shop = format!("ik-{}-shop", c.suffix);
    c.namespace(&shop, json!({}));
    let kc = c.agent_kubeconfig();
    let node = c.node();
    let api: Api<Pod> = Api::namespaced(c.admin.clone(), &shop);
    // A sidecar pod of this node whose validation init container failed with Istio's code.
    let broken = |name: &str| {
        let p: Pod = serde_json::from_value(injected_here(&shop, name, &node)).expect("pod");
        c.rt.block_on(api.create(&PostParams::default(), &p))
            .expect("create pod");
        let status = json!({"status": {"phase": "Pending", "initContainerStatuses": [{
            "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false,
            "restartCount": 1,
            "state": {"terminated": {"exitCode": 126, "reason": "Error"}}}]}});
        c.rt.block_on(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)))
            .expect("patch status");
    };

    // Label mode.
    let dir = TempDir::new("acni-ikrp");
    let agent = AgentProcess::start_kube(
        &dir.join("label"),
        &kc,
        &node,
        &["--repair-repair-pods=false", "--repair-label-pods=true"],
    );
    broken("labelled");
    let label = |name: &str| {
        c.rt.block_on(api.get(name))
            .ok()
            .and_then(|p| p.metadata.labels)
            .and_then(|l| l.get("cni.istio.io/uninitialized").cloned())
    };
    wait("the broken pod labelled", &agent, || {
        label("labelled").as_deref() == Some("true")
    });
    wait("the LabelBrokenPod Event", &agent, || {
        !c.events(&shop, "labelled", "LabelBrokenPod").is_empty()
    });
    drop(agent);

    // Delete mode: the chart grants `delete` on pods only here; the test grants it the same way.
    let role = format!("{}-delete", c.role_name());
    c.rt.block_on(async {
        let r: ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": role},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]}))
        .expect("role");
        Api::<ClusterRole>::all(c.admin.clone())
            .create(&PostParams::default(), &r)
            .await
            .expect("create ClusterRole");
        let b: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": c.home}]}))
        .expect("binding");
        Api::<ClusterRoleBinding>::all(c.admin.clone())
            .create(&PostParams::default(), &b)
            .await
            .expect("create ClusterRoleBinding");
    });
    let agent = AgentProcess::start_kube(
        &dir.join("delete"),
        &kc,
        &node,
        &["--repair-repair-pods=false", "--repair-delete-pods=true"],
    );
    broken("deleted");
    wait("the DeleteBrokenPod Event", &agent, || {
        !c.events(&shop, "deleted", "DeleteBrokenPod").is_empty()
    });
    // No kubelet here: the pod is marked for deletion (a kubelet would then remove it).
    wait("the broken pod deleted", &agent, || {
        c.rt.block_on(api.get("deleted"))
            .map_or(true, |p| p.metadata.deletion_timestamp.is_some())
    });
    assert_eq!(
        label("labelled").as_deref(),
        Some("true"),
        "the other pod is left as it was"
    );
    drop(agent);
    c.rt.block_on(async {
        let _ = Api::<ClusterRoleBinding>::all(c.admin.clone())
            .delete(&role, &DeleteParams::default())
            .await;
        let _ = Api::<ClusterRole>::all(c.admin.clone())
            .delete(&role, &DeleteParams::default())
            .await;
    });
}
