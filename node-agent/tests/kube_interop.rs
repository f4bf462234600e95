//! The Kubernetes pod source and status writer against the REAL kube-apiserver peer
//! (`../shared/peers/kube.sh`, Kubernetes v1.20), as the agent's ServiceAccount with exactly
//! the RBAC of `manifests/ambient-cni.yaml`: this node's pods only, namespace labels,
//! status changes, the status annotation, events, and 403 for everything else.
//!
//! Needs `KUBECONFIG` (admin) and `KUBE_PEER_DIR` from `kube.sh start`; skips without them,
//! fails without them when `CI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambient_cni_agent::kube_api::pods::KubeSource;
use ambient_cni_agent::kube_api::status::KubeStatus;
use ambient_cni_agent::mesh::hooks::StatusWriter;
use ambient_cni_agent::pods::source::{PodSource, SourceEvent};
use ambient_cni_agent::pods::{self, PodId};
use anyhow::{bail, ensure, Context};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const SA: &str = "ambient-cni";
const WORKLOAD_SA: &str = "workload";
const WAIT: Duration = Duration::from_secs(20);

struct Peer {
    kubeconfig: PathBuf,
    dir: PathBuf,
}

/// The peer's variables; `None` (skip) without them, a failure without them in CI.
fn peer() -> Option<Peer> {
    let kubeconfig = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
    let dir = std::env::var_os("KUBE_PEER_DIR").filter(|v| !v.is_empty());
    match (kubeconfig, dir) {
        (Some(k), Some(d)) => Some(Peer {
            kubeconfig: k.into(),
            dir: d.into(),
        }),
        _ if std::env::var_os("CI").is_some() => panic!(
            "CI is set but KUBECONFIG and/or KUBE_PEER_DIR are not: start the real kube-apiserver \
             peer with `../shared/peers/kube.sh start` (see ../shared/peers/README.md)"
        ),
        _ => {
            eprintln!(
                "SKIP kube_interop: KUBECONFIG and KUBE_PEER_DIR are not set; start the real \
                 kube-apiserver peer with `../shared/peers/kube.sh start` and export its two lines \
                 (see ../shared/peers/README.md)"
            );
            None
        }
    }
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    ambient_cni_tests::peers::kube_client(kubeconfig).await
}

/// One test's cluster objects: two namespaces, the agent's RBAC (cluster-scoped names unique).
struct Fixture {
    admin: Client,
    peer_dir: PathBuf,
    suffix: String,
    ns1: String,
    ns2: String,
    node: String,
    other_node: String,
}

impl Fixture {
    async fn new(peer: &Peer) -> anyhow::Result<Fixture> {
        let admin = client_for(&peer.kubeconfig).await?;
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let suffix = format!("{:x}{:x}", std::process::id(), nanos & 0xff_ffff);
        let f = Fixture {
            admin,
            peer_dir: peer.dir.clone(),
            ns1: format!("ki-{suffix}-a"),
            ns2: format!("ki-{suffix}-b"),
            node: format!("node-{suffix}-here"),
            other_node: format!("node-{suffix}-there"),
            suffix,
        };
        Ok(f)
    }

    /// Creates the namespaces and the agent's RBAC.
    async fn setup(&self) -> anyhow::Result<()> {
        let nss: Api<Namespace> = Api::all(self.admin.clone());
        for (name, labels) in [
            (&self.ns1, json!({"istio.io/dataplane-mode": "ambient"})),
            (&self.ns2, json!({"team": "b"})),
        ] {
            let ns: Namespace =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
            nss.create(&PostParams::default(), &ns).await?;
            // Test pods run as their own account (no token: nothing mounts it).
            let sa: ServiceAccount =
                serde_json::from_value(json!({"metadata": {"name": WORKLOAD_SA}}))?;
            Api::<ServiceAccount>::namespaced(self.admin.clone(), name)
                .create(&PostParams::default(), &sa)
                .await?;
        }
        self.apply_rbac().await
    }

    /// Creates the ServiceAccount, ClusterRole and ClusterRoleBinding of our manifest, as
    /// written there except for the unique cluster-scoped names and the namespace.
    async fn apply_rbac(&self) -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/ambient-cni.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let role_name = format!("ambient-cni-{}", self.suffix);
        let mut applied = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut obj = Value::deserialize(doc)?;
            let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "ServiceAccount" => {
                    obj["metadata"]["namespace"] = json!(self.ns1);
                    let sa: ServiceAccount = serde_json::from_value(obj)?;
                    ensure!(
                        sa.metadata.name.as_deref() == Some(SA),
                        "manifest ServiceAccount is not {SA}"
                    );
                    Api::<ServiceAccount>::namespaced(self.admin.clone(), &self.ns1)
                        .create(&PostParams::default(), &sa)
                        .await?;
                }
                "ClusterRole" => {
                    obj["metadata"]["name"] = json!(role_name);
                    let r: ClusterRole = serde_json::from_value(obj)?;
                    Api::<ClusterRole>::all(self.admin.clone())
                        .create(&PostParams::default(), &r)
                        .await?;
                }
                "ClusterRoleBinding" => {
                    obj["metadata"]["name"] = json!(role_name);
                    obj["roleRef"]["name"] = json!(role_name);
                    for s in obj["subjects"].as_array_mut().into_iter().flatten() {
                        s["namespace"] = json!(self.ns1);
                    }
                    let b: ClusterRoleBinding = serde_json::from_value(obj)?;
                    Api::<ClusterRoleBinding>::all(self.admin.clone())
                        .create(&PostParams::default(), &b)
                        .await?;
                }
                _ => continue,
            }
            applied.push(kind);
        }
        applied.sort();
        ensure!(
            applied == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"],
            "manifest RBAC objects: {applied:?}"
        );
        Ok(())
    }

    /// A client that IS the agent's ServiceAccount (a TokenRequest token), once RBAC is effective.
    async fn agent_client(&self) -> anyhow::Result<Client> {
        let out = std::process::Command::new(self.peer_dir.join("kubeconfig-for"))
            .args([&self.ns1, SA])
            .output()
            .context("running kubeconfig-for")?;
        ensure!(
            out.status.success(),
            "kubeconfig-for failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout)?;
        let path = stdout
            .lines()
            .last()
            .context("kubeconfig-for printed nothing")?
            .trim();
        let client = client_for(Path::new(path)).await?;
        // The binding reaches the authorizer's cache shortly after creation.
        let probe: Api<Pod> = Api::all(client.clone());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match probe.list(&ListParams::default().limit(1)).await {
                Ok(_) => return Ok(client),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    bail!("agent client never allowed: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Creates a pod bound to `node` and gives it the status a kubelet would (Running, IP).
    async fn pod(&self, ns: &str, name: &str, node: &str, ip: &str) -> anyhow::Result<Pod> {
        let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": WORKLOAD_SA, "automountServiceAccountToken": false,
                "containers": [{"name": "c", "image": "busybox"}]}
        }))?;
        api.create(&PostParams::default(), &p).await?;
        let st = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        Ok(api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&st))
            .await?)
    }

    async fn cleanup(&self) {
        let force = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        for ns in [&self.ns1, &self.ns2] {
            let api: Api<Pod> = Api::namespaced(self.admin.clone(), ns);
            if let Ok(list) = api.list(&ListParams::default()).await {
                for p in list.items {
                    let _ = api
                        .delete(p.metadata.name.as_deref().unwrap_or_default(), &force)
                        .await;
                }
            }
            let _ = Api::<Namespace>::all(self.admin.clone())
                .delete(ns, &DeleteParams::default())
                .await;
        }
        let name = format!("ambient-cni-{}", self.suffix);
        let _ = Api::<ClusterRoleBinding>::all(self.admin.clone())
            .delete(&name, &DeleteParams::default())
            .await;
        let _ = Api::<ClusterRole>::all(self.admin.clone())
            .delete(&name, &DeleteParams::default())
            .await;
    }
}

/// Source events, with what was skipped while waiting for a particular one.
struct Events {
    rx: mpsc::Receiver<SourceEvent>,
    skipped: Vec<SourceEvent>,
}

fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or_default(),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Events {
    async fn until(
        &mut self,
        what: &str,
        f: impl Fn(&SourceEvent) -> bool,
    ) -> anyhow::Result<SourceEvent> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .with_context(|| format!("no {what} within {WAIT:?}"))?
                .context("source ended")?;
            if f(&ev) {
                return Ok(ev);
            }
            self.skipped.push(ev);
        }
    }

    async fn pod(&mut self, key: &str, f: impl Fn(&Pod) -> bool) -> anyhow::Result<Arc<Pod>> {
        match self
            .until(
                &format!("event for pod {key}"),
                |e| matches!(e, SourceEvent::Pod(p) if pod_name(p) == key && f(p)),
            )
            .await?
        {
            SourceEvent::Pod(p) => Ok(p),
            _ => unreachable!(),
        }
    }

    fn saw_pod(&self, key: &str) -> bool {
        self.skipped.iter().any(|e| match e {
            SourceEvent::Pod(p) | SourceEvent::PodDeleted(p) => pod_name(p) == key,
            _ => false,
        })
    }
}

fn forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) -> anyhow::Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.is_forbidden() => Ok(()),
        other => bail!("{what}: want 403 Forbidden, got {other:?}"),
    }
}

async fn body(f: &Fixture) -> anyhow::Result<()> {
    let agent = f.agent_client().await?;
    let here = f.pod(&f.ns1, "here", &f.node, "10.244.1.5").await?;
    f.pod(&f.ns1, "there", &f.other_node, "10.244.2.5").await?;
    f.pod(&f.ns2, "here-b", &f.node, "10.244.1.6").await?;

    // Initial sync as the agent: this node's pods (with status), all namespaces' labels.
    let source = Arc::new(KubeSource::new(agent.clone(), f.node.clone()));
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(source.clone().run(tx));
    let _abort = AbortOnDrop(task);
    let mut evs = Events {
        rx,
        skipped: Vec::new(),
    };
    evs.until("Synced", |e| matches!(e, SourceEvent::Synced))
        .await?;
    let initial = std::mem::take(&mut evs.skipped);
    let mut pods_seen: Vec<String> = initial
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Pod(p) => Some(pod_name(p)),
            _ => None,
        })
        .collect();
    pods_seen.sort();
    ensure!(
        pods_seen == [format!("{}/here", f.ns1), format!("{}/here-b", f.ns2)],
        "initial pods: {pods_seen:?}"
    );
    let ns_labels: BTreeMap<String, BTreeMap<String, String>> = initial
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Namespace { name, labels } => Some((name.clone(), labels.clone())),
            _ => None,
        })
        .collect();
    ensure!(
        ns_labels
            .get(&f.ns1)
            .and_then(|l| l.get("istio.io/dataplane-mode"))
            .map(String::as_str)
            == Some("ambient"),
        "namespace {} labels: {:?}",
        f.ns1,
        ns_labels.get(&f.ns1)
    );
    ensure!(
        ns_labels.contains_key("kube-system"),
        "all namespaces are listed"
    );
    let p = initial
        .iter()
        .find_map(|e| match e {
            SourceEvent::Pod(p) if pod_name(p) == format!("{}/here", f.ns1) => Some(p.clone()),
            _ => None,
        })
        .context("here")?;
    ensure!(
        pods::ips(&p) == ["10.244.1.5".parse::<std::net::IpAddr>()?],
        "IPs of here"
    );
    ensure!(p.metadata.uid == here.metadata.uid, "uid of here");
    eprintln!(
        "pod object as served: {} bytes of JSON; as kept by the source: {} bytes",
        serde_json::to_vec(&here)?.len(),
        serde_json::to_vec(&*p)?.len()
    );

    // Namespace label changes arrive.
    let nss: Api<Namespace> = Api::all(f.admin.clone());
    let lbl = json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}});
    nss.patch(&f.ns2, &PatchParams::default(), &Patch::Merge(&lbl))
        .await?;
    evs.until("namespace label change", |e| {
        matches!(e, SourceEvent::Namespace { name, labels }
            if *name == f.ns2 && labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("ambient"))
    })
    .await?;

    // New pods: the other node's is never seen, ours is, and so is its kubelet status.
    f.pod(&f.ns1, "there2", &f.other_node, "10.244.2.7").await?;
    f.pod(&f.ns1, "here2", &f.node, "10.244.1.7").await?;
    let key2 = format!("{}/here2", f.ns1);
    evs.pod(&key2, |p| !pods::ips(p).is_empty()).await?;
    ensure!(
        !evs.saw_pod(&format!("{}/there2", f.ns1)),
        "a pod of another node was delivered"
    );

    // The plugin's cache-miss lookup, as the agent.
    let found = source
        .get(&f.ns1, "here")
        .await
        .map_err(anyhow::Error::msg)?
        .context("here not found")?;
    ensure!(
        found
            .namespace_labels
            .get("istio.io/dataplane-mode")
            .map(String::as_str)
            == Some("ambient")
    );
    ensure!(source
        .get(&f.ns1, "nope")
        .await
        .map_err(anyhow::Error::msg)?
        .is_none());

    // The status annotation, as the agent: visible to others, and coming back through the watch.
    let status = KubeStatus::new(agent.clone()).with_node(f.node.clone());
    let id = pods::pod_id(&here);
    let admin_pods: Api<Pod> = Api::namespaced(f.admin.clone(), &f.ns1);
    status
        .set(&id, Some("pending"))
        .await
        .map_err(anyhow::Error::msg)?;
    status
        .set(&id, Some("enabled"))
        .await
        .map_err(anyhow::Error::msg)?;
    let got = admin_pods.get("here").await?;
    ensure!(
        pods::annotation(&got, "ambient.istio.io/redirection") == Some("enabled"),
        "annotation after set: {:?}",
        got.metadata.annotations
    );
    let key = format!("{}/here", f.ns1);
    evs.pod(&key, |p| {
        pods::annotation(p, "ambient.istio.io/redirection") == Some("enabled")
    })
    .await?;
    status.set(&id, None).await.map_err(anyhow::Error::msg)?;
    let got = admin_pods.get("here").await?;
    ensure!(
        pods::annotation(&got, "ambient.istio.io/redirection").is_none(),
        "annotation after removal: {:?}",
        got.metadata.annotations
    );
    let missing = PodId {
        namespace: f.ns1.clone(),
        name: "never-existed".into(),
        uid: "x".into(),
    };
    status
        .set(&missing, None)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(status.set(&missing, Some("enabled")).await.is_err());

    // Events, as the agent.
    status
        .event(&id, "EnrollmentFailed", "no ztunnel connection")
        .await
        .map_err(anyhow::Error::msg)?;
    let events: Api<Event> = Api::namespaced(f.admin.clone(), &f.ns1);
    let list = events.list(&ListParams::default()).await?;
    let ev = list
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("EnrollmentFailed"))
        .context("event not recorded")?;
    ensure!(ev.involved_object.name.as_deref() == Some("here"));
    ensure!(ev.involved_object.uid == here.metadata.uid);
    ensure!(ev.type_.as_deref() == Some("Warning"));
    ensure!(ev.source.as_ref().and_then(|s| s.host.as_deref()) == Some(f.node.as_str()));

    // Least privilege: everything else is forbidden to the agent.
    let agent_pods: Api<Pod> = Api::namespaced(agent.clone(), &f.ns1);
    let spec_patch = json!({"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}});
    forbidden(
        "patch pod (not status)",
        agent_pods
            .patch("here", &PatchParams::default(), &Patch::Merge(&spec_patch))
            .await,
    )?;
    forbidden(
        "delete pod",
        agent_pods.delete("here", &DeleteParams::default()).await,
    )?;
    let p: Pod = serde_json::from_value(
        json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    )?;
    forbidden(
        "create pod",
        agent_pods.create(&PostParams::default(), &p).await,
    )?;
    forbidden(
        "list secrets",
        Api::<Secret>::namespaced(agent.clone(), &f.ns1)
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "patch namespace",
        Api::<Namespace>::all(agent.clone())
            .patch(&f.ns1, &PatchParams::default(), &Patch::Merge(&lbl))
            .await,
    )?;

    // A graceful delete is a change (deletionTimestamp); the removal is a deletion with the last object.
    admin_pods.delete("here2", &DeleteParams::default()).await?;
    evs.pod(&key2, |p| p.metadata.deletion_timestamp.is_some())
        .await?;
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    admin_pods.delete("here2", &force).await?;
    let gone = evs
        .until(
            "deletion of here2",
            |e| matches!(e, SourceEvent::PodDeleted(p) if pod_name(p) == key2),
        )
        .await?;
    let SourceEvent::PodDeleted(p) = gone else {
        unreachable!()
    };
    ensure!(
        pods::ips(&p) == ["10.244.1.7".parse::<std::net::IpAddr>()?],
        "last object keeps IPs"
    );
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_service_account_against_real_apiserver() {
    let Some(peer) = peer() else { return };
    let f = Fixture::new(&peer).await.expect("admin client");
    let started = std::time::Instant::now();
    let result = async {
        f.setup()
            .await
            .context("creating test namespaces and RBAC")?;
        body(&f).await
    }
    .await;
    f.cleanup().await;
    result.unwrap();
    eprintln!("real apiserver interop passed in {:?}", started.elapsed());
}
