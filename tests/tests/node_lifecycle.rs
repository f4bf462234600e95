//! The whole lifecycle the way users run it, on a REAL kubelet node (`../shared/peers/node.sh`):
//! our image (`scripts/image.sh`) imported into the node's containerd, our chart installed with
//! the real helm, stock ztunnel as a host process on the socket the chart mounts, pods created
//! through the API and started by the kubelet through containerd's CRI and the node's real CNI
//! chain. Steps, in the words: install, upgrade, crash, the primary rewrites its
//! conflist, sandbox recreated, sidecar pods (side by side with ambient ones, and the race
//! repair: `node_lifecycle/sidecar.rs`), uninstall; then the pod-start figures (mesh vs
//! plain). The install is the migration from istio-cni (docs/migrating-from-istio-cni.md): the node starts
//! with an `istio-cni` entry chained, our chart is installed with Istio's values file (refused,
//! `/readyz` says why), the entry is removed as istio-cni's uninstall does, then we chain; it
//! also sets `logLevel`/`global.logAsJson` and checks the agent's log (the upgrade resets them).
//!
//! Assertions are kernel and peer facts: rules in the pod netns (`ambient-cni-agent redirect
//! show`), ztunnel's listeners (and their inodes) in it, ztunnel's access log, host files.
//! Every mesh pod's container checks at its start that ztunnel listens in its netns and exits
//! 1 otherwise, so `restartCount == 0` means "never ran uncaptured".
//!
//! Needs `NODE_KUBECONFIG`, `HELM_BIN`, `AMBIENT_CNI_IMAGE_TAR`, `ZTUNNEL_BIN` (`scripts/test.sh`
//! sets them); skips without them, fails instead when `CI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_cni_tests::bench::pct;
use ambient_cni_tests::node::*;
use ambient_cni_tests::peers::*;
use ambient_cni_tests::*;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::Client;
use serde_json::{json, Value};

#[path = "node_lifecycle/sidecar.rs"]
mod sidecar;

const SYSTEM_NS: &str = "istio-system";
const RELEASE: &str = "ambient-cni";
const MESH: &str = "lc-mesh";
const PLAIN: &str = "lc-plain";
const ZT_SOCK: &str = "/var/run/ztunnel/ztunnel.sock";
const RUN_DIR: &str = "/var/run/ambient-cni";
const ANNOTATION: &str = "ambient.istio.io/redirection";
const ZT_PORTS: [u16; 3] = [15001, 15006, 15008];
const APP_PORT: u16 = 8080;
const ROLL_PODS: usize = 4;
const BENCH_PODS: usize = 20;
const LONG: Duration = Duration::from_secs(120);

/// The mesh pods ztunnel's local xDS names (it must know them before it starts).
fn mesh_pod_names() -> Vec<String> {
    let mut v = vec!["web".to_owned(), "after-rewrite".to_owned()];
    v.extend((0..ROLL_PODS).map(|i| format!("roll-{i}")));
    v.extend((0..BENCH_PODS).map(|i| format!("bench-mesh-{i}")));
    v
}

/// A pod: busybox's httpd on :8080, with (`probe`) a readiness probe on it (for mesh pods the
/// kubelet's probe goes through the host probe SNAT). `check_captured`: the container first
/// checks that ztunnel listens in its netns, and exits 1 when it does not.
fn pod_manifest(name: &str, check_captured: bool, probe: bool) -> Pod {
    let check = if check_captured {
        "netstat -ltn | grep -q ':15001 ' || { echo 'started uncaptured' >&2; exit 1; }; "
    } else {
        ""
    };
    let script = format!(
        "{check}mkdir -p /tmp/www && echo ok-{name} >/tmp/www/index.html && exec httpd -f -p {APP_PORT} -h /tmp/www"
    );
    let mut container = json!({
        "name": "app",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
    });
    if probe {
        container["readinessProbe"] = json!({
            "httpGet": {"path": "/", "port": APP_PORT},
            "periodSeconds": 1,
            "failureThreshold": 1
        });
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "enableServiceLinks": false,
            "containers": [container]
        }
    }))
    .expect("pod manifest")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref().and_then(|s| s.pod_ip.clone())
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

fn annotation(p: &Pod) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION).cloned())
}

/// Lines of `text` containing `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// The suite's world: API client, ztunnel, what it installed; cleaned up on drop (also when
/// a step fails): test namespaces, the release, the extra image tag, ztunnel.
struct World {
    rt: tokio::runtime::Runtime,
    client: Client,
    peer: NodePeer,
    dir: TempDir,
    chart: PathBuf,
    image: String,
    next_image: String,
    conflist_before: String,
    zt: Option<Ztunnel>,
    installed: bool,
    /// Installed at some point: the host is cleaned after the test whatever happened.
    touched_host: bool,
    /// The node's conflist holds the `istio-cni` entry the migration step adds (put back to
    /// `conflist_before` on drop).
    istio_entry: bool,
    namespaces: Vec<String>,
}

impl World {
    fn new(peer: NodePeer) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let kc = peer.kubeconfig.clone();
        let client = rt
            .block_on(ambient_cni_tests::peers::kube_client(&kc))
            .expect("NODE_KUBECONFIG");
        let image = image_ref(&peer.image_tar).expect("image ref");
        let next_image = format!("{image}-next");
        Self {
            rt,
            client,
            dir: TempDir::new("acni-node"),
            chart: Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/charts/ambient-cni"),
            image,
            next_image,
            conflist_before: String::new(),
            zt: None,
            installed: false,
            touched_host: false,
            istio_entry: false,
            namespaces: Vec::new(),
            peer,
        }
    }

    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn zt(&self) -> &Ztunnel {
        self.zt.as_ref().expect("ztunnel started")
    }

    /// Everything a failure message should show: our pods, the agent's log tail, ztunnel's.
    fn diag(&self) -> String {
        let agent = self
            .agent_pod()
            .map(|p| p.metadata.name.unwrap_or_default());
        let zt = self.zt.as_ref().map(|z| z.log_text()).unwrap_or_default();
        let zt_tail: Vec<&str> = zt.lines().rev().take(30).collect();
        format!(
            "agent pod {agent:?}\nconflist: {}\nztunnel log (last 30, newest first):\n{}",
            std::fs::read_to_string(NODE_CONFLIST).unwrap_or_default(),
            zt_tail.join("\n")
        )
    }

    fn wait(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) {
        assert!(wait_for(limit, cond), "timed out: {what}\n{}", self.diag());
    }

    fn helm(&self, args: &[&str]) -> Result<String, String> {
        let kc = self.peer.kubeconfig.display().to_string();
        let mut a = args.to_vec();
        a.extend_from_slice(&["--kubeconfig", &kc]);
        run(&self.peer.helm, &a)
    }

    /// `helm install`/`upgrade` with the image settings the test controls, then `extra`.
    fn helm_release(&self, verb: &str, image: &str, extra: &[&str]) -> Result<String, String> {
        let (repo, tag) = image.rsplit_once(':').expect("image ref REPO:TAG");
        let chart = self.chart.display().to_string();
        let repo = format!("image.repository={repo}");
        let tag = format!("image.tag={tag}");
        let mut args = vec![verb, RELEASE, &chart, "-n", SYSTEM_NS];
        if verb == "install" {
            args.push("--create-namespace");
        }
        args.extend_from_slice(&["--set", &repo, "--set", &tag]);
        args.extend_from_slice(&["--set", "image.pullPolicy=Never"]);
        args.extend_from_slice(extra);
        self.helm(&args)
    }

    fn get(&self, ns: &str, name: &str) -> Option<Pod> {
        let api = self.pods(ns);
        let name = name.to_owned();
        self.rt
            .block_on(async move { api.get_opt(&name).await })
            .ok()
            .flatten()
    }

    fn list(&self, ns: &str, selector: &str) -> Vec<Pod> {
        let api = self.pods(ns);
        let lp = ListParams::default().labels(selector);
        self.rt
            .block_on(async move { api.list(&lp).await })
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The agent's pod (the DaemonSet's, not terminating), if any.
    fn agent_pod(&self) -> Option<Pod> {
        self.list(SYSTEM_NS, "app.kubernetes.io/name=ambient-cni")
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
    }

    /// The agent pod's container log (through the API server, as `kubectl logs`).
    fn agent_log(&self, pod: &Pod) -> String {
        let api = self.pods(SYSTEM_NS);
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.rt
            .block_on(async move { api.logs(&name, &LogParams::default()).await })
            .unwrap_or_else(|e| panic!("agent log: {e}"))
    }

    fn agent_pods_count(&self) -> usize {
        self.list(SYSTEM_NS, "app.kubernetes.io/name=ambient-cni")
            .len()
    }

    /// Waits for a Ready agent pod running `image`; returns it.
    fn wait_agent_ready(&self, image: &str) -> Pod {
        let mut found = None;
        self.wait(&format!("agent pod Ready with {image}"), LONG, || {
            let pods = self.list(SYSTEM_NS, "app.kubernetes.io/name=ambient-cni");
            found = pods.into_iter().find(|p| {
                is_ready(p)
                    && p.metadata.deletion_timestamp.is_none()
                    && p.spec.as_ref().is_some_and(|s| {
                        s.containers
                            .first()
                            .and_then(|c| c.image.as_deref())
                            .is_some_and(|i| i == image)
                    })
            });
            found.is_some() && self.agent_pods_count() == 1
        });
        found.expect("agent pod")
    }

    /// Creates `ns` (labelled for the mesh or not) and waits for its default ServiceAccount.
    fn namespace(&mut self, ns: &str, mesh: bool) {
        let labels = if mesh {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        let obj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}}))
                .expect("namespace");
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.rt
            .block_on(async move { api.create(&PostParams::default(), &obj).await })
            .unwrap_or_else(|e| {
                panic!("create namespace {ns}: {e} (left over from a failed run?)")
            });
        self.namespaces.push(ns.to_owned());
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        self.wait(&format!("{ns}/default ServiceAccount"), LONG, || {
            let sa = sa.clone();
            self.rt
                .block_on(async move { sa.get_opt("default").await })
                .ok()
                .flatten()
                .is_some()
        });
    }

    fn create_pod(&self, ns: &str, name: &str, check_captured: bool) {
        self.create_pod_with(ns, name, check_captured, true);
    }

    fn create_pod_with(&self, ns: &str, name: &str, check_captured: bool, probe: bool) {
        let api = self.pods(ns);
        let pod = pod_manifest(name, check_captured, probe);
        self.rt
            .block_on(async move { api.create(&PostParams::default(), &pod).await })
            .unwrap_or_else(|e| panic!("create pod {ns}/{name}: {e}"));
    }

    /// Waits until the pod is Ready; returns it.
    fn wait_pod_ready(&self, ns: &str, name: &str) -> Pod {
        let mut last = None;
        let ok = wait_for(LONG, || {
            last = self.get(ns, name);
            last.as_ref().is_some_and(is_ready)
        });
        assert!(
            ok,
            "pod {ns}/{name} not Ready: {:?}\n{}",
            last.and_then(|p| p.status),
            self.diag()
        );
        last.expect("pod")
    }

    /// The pod's sandbox netns (found by its IP).
    fn netns_of(&self, p: &Pod) -> NamedNetns {
        let ip = pod_ip(p).expect("pod IP");
        let mut name = None;
        self.wait(
            &format!("a netns holding {ip}"),
            Duration::from_secs(10),
            || {
                name = netns_with_ip(&ip);
                name.is_some()
            },
        );
        NamedNetns::existing(&name.expect("netns"))
    }

    /// `ambient-cni-agent redirect show` on the pod netns: the rules are complete.
    fn rules_complete(&self, ns: &NamedNetns) -> bool {
        let path = ns.path();
        run(
            &agent_bin(),
            &[
                "redirect",
                "show",
                "--netns",
                &path,
                "--backend",
                "nftables",
            ],
        )
        .is_ok_and(|out| out.lines().any(|l| l == "complete true"))
    }

    /// Any of our rules in the netns, whichever backend.
    fn any_rules(ns: &NamedNetns) -> bool {
        let nft = String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).into_owned();
        let ipt = String::from_utf8_lossy(&ns.exec(&["iptables-save"]).stdout).into_owned();
        nft.contains("istio") || ipt.contains("ISTIO_")
    }

    /// Captured: complete rules, and ztunnel (this one) listens in the netns.
    fn assert_captured(&self, what: &str, ns: &NamedNetns) {
        let pid = self.zt().pid();
        self.wait(&format!("{what} captured"), Duration::from_secs(30), || {
            ZT_PORTS.iter().all(|p| port_owners(ns, *p) == vec![pid])
        });
        assert!(
            self.rules_complete(ns),
            "{what}: rules incomplete\n{}",
            self.diag()
        );
    }

    fn assert_not_captured(&self, what: &str, ns: &NamedNetns) {
        let ports = listening_ports(ns);
        assert!(
            !ZT_PORTS.iter().any(|p| ports.contains(p)),
            "{what}: ztunnel listens in it: {ports:?}"
        );
        assert!(!Self::any_rules(ns), "{what}: has redirection rules");
    }

    fn outbound_inode(ns: &NamedNetns) -> Option<u64> {
        listeners(ns)
            .into_iter()
            .find(|l| l.port == 15001)
            .map(|l| l.inode)
    }

    /// Client netns → server pod's httpd, through ztunnel's inbound (its access log shows
    /// the connection, from the client's own address, to that pod).
    fn assert_inbound(&self, client: &NamedNetns, server: &Pod) {
        let ip = pod_ip(server).expect("server IP");
        let name = server.metadata.name.clone().unwrap_or_default();
        let to = format!("{ip}:{APP_PORT}");
        let (local, body) = http_get_from(client, &to)
            .unwrap_or_else(|e| panic!("GET http://{to}/ from the client: {e}\n{}", self.diag()));
        assert!(body.contains(&format!("ok-{name}")), "{body}");
        let dst = format!("dst.addr={to}");
        let src = format!("src.addr={local}");
        self.wait(
            "ztunnel logs the inbound connection",
            Duration::from_secs(10),
            || {
                !self
                    .zt()
                    .log_lines_with(&[&dst, &src, "direction=\"inbound\"", &name])
                    .is_empty()
            },
        );
    }

    fn agent_status(&self) -> Value {
        run(&agent_bin(), &["status", "--json", "--run-dir", RUN_DIR])
            .ok()
            .and_then(|o| serde_json::from_str(&o).ok())
            .unwrap_or(Value::Null)
    }

    /// (namespace/name) of the pods the running agent holds.
    fn agent_holds(&self) -> Vec<String> {
        let mut v: Vec<String> = self.agent_status()["pods"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["namespace"].as_str().unwrap_or_default(),
                            p["name"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Pods first, while the agent still answers their DELs; then the release. Every
        // namespace is deleted before waiting for any (their pods terminate together).
        let namespaces: Vec<String> = self.namespaces.drain(..).rev().collect();
        for ns in &namespaces {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let n = ns.clone();
            let _ = self
                .rt
                .block_on(async move { api.delete(&n, &DeleteParams::default()).await });
        }
        for ns in namespaces {
            let api: Api<Namespace> = Api::all(self.client.clone());
            wait_for(Duration::from_secs(90), || {
                let api = api.clone();
                let n = ns.clone();
                self.rt
                    .block_on(async move { api.get_opt(&n).await })
                    .is_ok_and(|o| o.is_none())
            });
        }
        if self.installed {
            let _ = self.helm(&["uninstall", RELEASE, "-n", SYSTEM_NS]);
            wait_for(Duration::from_secs(60), || self.agent_pods_count() == 0);
        }
        if self.istio_entry && !self.conflist_before.is_empty() {
            let _ = write_conflist(&self.conflist_before);
        }
        if self.touched_host {
            // After a failure, the next run needs a clean node: what an operator would do.
            let _ = run(
                &agent_bin(),
                &[
                    "uninstall",
                    "--cni-bin-dir",
                    NODE_CNI_BIN,
                    "--cni-conf-dir",
                    "/etc/cni/net.d",
                ],
            );
        }
        let _ = ctr(&["images", "rm", &self.next_image]);
        self.zt.take();
    }
}

/// Watches captured pods' netns in the background: their rules stay complete and ztunnel's
/// outbound listener stays the same socket. Collects every violation seen.
struct KeepWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl KeepWatch {
    fn start(pods: Vec<(String, NamedNetns, u64)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut rounds = 0;
            while !s.load(Ordering::Relaxed) {
                for (name, ns, inode) in &pods {
                    let now = World::outbound_inode(ns);
                    if now != Some(*inode) {
                        v.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{name}: 15001 inode {now:?}, was {inode}"));
                    }
                    if !World::any_rules(ns) {
                        v.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{name}: rules gone"));
                    }
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            rounds
        });
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops; returns (rounds watched, violations).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0);
        let v = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (rounds, v)
    }
}

impl Drop for KeepWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Step 1: Install: image imported, chart installed, DaemonSet Ready, plugin and entry on the
/// host, mesh pods captured when the kubelet starts them, plain pods not.
fn install(w: &mut World) -> (Pod, NamedNetns) {
    let tar = w.peer.image_tar.display().to_string();
    ctr(&["images", "import", "--platform", "linux/amd64", &tar]).expect("ctr images import");
    let have = ctr(&["images", "ls", "-q"]).expect("ctr images ls");
    assert!(
        have.lines().any(|l| l == w.image),
        "{} not imported: {have}",
        w.image
    );
    ctr(&["images", "tag", "--force", &w.image, &w.next_image]).expect("ctr images tag");

    w.conflist_before = std::fs::read_to_string(NODE_CONFLIST).expect("node conflist");
    assert!(
        conf_files_naming_us().is_empty() && bin_files_of_ours().is_empty(),
        "ambient-cni is already on the node (a failed earlier run? `node.sh stop` cleans up)"
    );

    // Migration (docs/migrating-from-istio-cni.md), as a node still chained with istio-cni.
    let with_istio = with_istio_cni_entry(&w.conflist_before);
    w.istio_entry = true;
    write_conflist(&with_istio).expect("add istio-cni's entry");

    // Our chart with Istio's values file for a plain cluster, unchanged, plus log settings.
    let started = Instant::now();
    w.installed = true;
    w.touched_host = true;
    let istio_values = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/istio-values/plain.yaml")
        .display()
        .to_string();
    let extra = [
        "-f",
        &istio_values,
        "--set",
        "logLevel=debug",
        "--set",
        "global.logAsJson=true",
    ];
    w.helm_release("install", &w.image.clone(), &extra)
        .expect("helm install");
    // Refused: not Ready, /readyz says why, the conflist is untouched (nothing half-applied).
    let health: std::net::SocketAddr = "127.0.0.1:8000".parse().expect("addr");
    let mut readyz = String::new();
    w.wait("/readyz names istio-cni", LONG, || {
        readyz = ambient_cni_tests::http::get(health, "/readyz", Duration::from_secs(2))
            .map(|(code, body)| format!("{code} {body}"))
            .unwrap_or_default();
        readyz.starts_with("503") && readyz.contains("istio-cni")
    });
    eprintln!("refused while istio-cni is chained: /readyz {readyz:?}");
    assert!(w.agent_pod().as_ref().is_some_and(|p| !is_ready(p)));
    assert_eq!(
        std::fs::read_to_string(NODE_CONFLIST).expect("conflist"),
        with_istio,
        "the conflist changed while istio-cni is chained"
    );
    // The documented step: istio-cni's uninstall removes its entry. Then we chain, and Ready.
    write_conflist(&w.conflist_before).expect("remove istio-cni's entry");
    w.istio_entry = false;
    let agent = w.wait_agent_ready(&w.image);
    eprintln!("helm install -> agent Ready: {:?}", started.elapsed());
    // logLevel and global.logAsJson reached the agent: JSON lines, debug ones among them.
    let log = w.agent_log(&agent);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let json: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    assert!(
        !lines.is_empty() && json.len() == lines.len(),
        "global.logAsJson=true: every agent log line JSON\n{log}"
    );
    assert!(
        json.iter().any(|v| v["level"] == "DEBUG"),
        "logLevel=debug: no DEBUG line\n{log}"
    );
    let spec = agent.spec.clone().expect("spec");
    assert_eq!(spec.host_network, Some(true));
    // What the DaemonSet put on the host.
    let plugin = Path::new(NODE_CNI_BIN).join("ambient-cni");
    let meta = std::fs::metadata(&plugin).expect("plugin binary on the host");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o755
    );
    assert!(chained_last(), "entry not chained last\n{}", w.diag());
    assert!(
        Path::new(RUN_DIR).join("plugin.sock").exists(),
        "plugin socket"
    );

    // ztunnel for the node, on the socket the chart mounts, knowing our mesh pods.
    let xds = w.dir.join("xds.yaml");
    let workloads: Vec<XdsWorkload> = mesh_pod_names()
        .iter()
        .map(|n| XdsWorkload::new(MESH, n, "default"))
        .collect();
    std::fs::write(&xds, xds_yaml(&workloads)).expect("write xds");
    let zt = Ztunnel::start(
        &w.peer.ztunnel,
        Path::new(ZT_SOCK),
        &xds,
        &w.dir.join("zt.log"),
    );
    w.zt = Some(zt);
    w.wait(
        "ztunnel ready (has our snapshot)",
        Duration::from_secs(60),
        || w.zt().ready(),
    );

    w.namespace(MESH, true);
    w.namespace(PLAIN, false);
    w.create_pod(MESH, "web", true);
    w.create_pod(PLAIN, "client", false);
    let web = w.wait_pod_ready(MESH, "web");
    let client = w.wait_pod_ready(PLAIN, "client");
    assert_eq!(restarts(&web), 0, "web started uncaptured");
    let web_ns = w.netns_of(&web);
    let client_ns = w.netns_of(&client);
    w.assert_captured("web", &web_ns);
    w.assert_not_captured("client", &client_ns);
    w.wait(
        "web's redirection annotation",
        Duration::from_secs(10),
        || w.get(MESH, "web").and_then(|p| annotation(&p)).as_deref() == Some("enabled"),
    );
    assert_eq!(annotation(&client), None);
    w.assert_inbound(&client_ns, &web);
    (client, client_ns)
}

/// Step 2: Upgrade to another tag: no captured pod loses its rules or its ztunnel listener, and
/// pods created during the roll-over end up captured without ever running uncaptured.
fn upgrade(w: &World, client_ns: &NamedNetns) {
    let web = w.get(MESH, "web").expect("web");
    let web_ns = w.netns_of(&web);
    let inode = World::outbound_inode(&web_ns).expect("web 15001");
    let watch = KeepWatch::start(vec![("web".into(), web_ns, inode)]);
    let old_agent = w.agent_pod().expect("agent");

    let started = Instant::now();
    // Chart defaults again (no -f / --set): text lines at info level.
    w.helm_release("upgrade", &w.next_image, &[])
        .expect("helm upgrade");
    // Pods created while the DaemonSet rolls (the old agent stops, the new one starts).
    for i in 0..ROLL_PODS {
        w.create_pod(MESH, &format!("roll-{i}"), true);
        std::thread::sleep(Duration::from_millis(700));
    }
    let agent = w.wait_agent_ready(&w.next_image);
    assert_ne!(
        agent.metadata.uid, old_agent.metadata.uid,
        "the DaemonSet rolled"
    );
    eprintln!("helm upgrade -> new agent Ready: {:?}", started.elapsed());
    let log = w.agent_log(&agent);
    assert!(
        log.lines().any(|l| l.contains(" INFO "))
            && !log
                .lines()
                .any(|l| l.starts_with('{') || l.contains(" DEBUG ")),
        "defaults: text lines at info level\n{log}"
    );
    for i in 0..ROLL_PODS {
        let name = format!("roll-{i}");
        let p = w.wait_pod_ready(MESH, &name);
        assert_eq!(restarts(&p), 0, "{name} ran uncaptured\n{}", w.diag());
        w.assert_captured(&name, &w.netns_of(&p));
    }
    let (rounds, violations) = watch.finish();
    assert!(rounds > 5, "watched only {rounds} rounds");
    assert!(
        violations.is_empty(),
        "during the upgrade: {violations:?}\n{}",
        w.diag()
    );
    let web = w.get(MESH, "web").expect("web");
    w.assert_inbound(client_ns, &web);
    let p = w.get(MESH, "roll-0").expect("roll-0");
    w.assert_inbound(client_ns, &p);
}

/// Step 3: kill -9 of the agent in its container: the kubelet restarts it, pods keep their rules
/// and proxies, the agent reconciles, ztunnel gets exactly one snapshot.
fn crash(w: &World) {
    let agent = w.agent_pod().expect("agent");
    let before = restarts(&agent);
    let procs = pod_processes(&uid(&agent));
    let main: Vec<&Proc> = procs
        .iter()
        .filter(|p| {
            p.argv
                .first()
                .is_some_and(|a| a.ends_with("ambient-cni-agent"))
        })
        .collect();
    assert_eq!(main.len(), 1, "the agent's process in its pod: {procs:?}");
    let mut watched = Vec::new();
    for name in ["web", "roll-0"] {
        let p = w.get(MESH, name).expect(name);
        let ns = w.netns_of(&p);
        let ino = World::outbound_inode(&ns).expect("15001");
        watched.push((name.to_owned(), ns, ino));
    }
    let watch = KeepWatch::start(watched);
    let log_before = w.zt().log_text().len();
    let pid = nix::unistd::Pid::from_raw(main[0].pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9 the agent");
    let killed = Instant::now();
    w.wait("the kubelet restarts the agent", LONG, || {
        w.agent_pod()
            .is_some_and(|p| restarts(&p) > before && is_ready(&p))
    });
    eprintln!(
        "agent kill -9 -> restarted and Ready: {:?}",
        killed.elapsed()
    );
    w.wait("ztunnel ready again", Duration::from_secs(30), || {
        w.zt().ready()
    });
    // The restarted agent holds every captured pod again.
    let want: Vec<String> = {
        let mut v = vec![format!("{MESH}/web")];
        v.extend((0..ROLL_PODS).map(|i| format!("{MESH}/roll-{i}")));
        v.sort();
        v
    };
    w.wait(
        "the agent reconciled every captured pod",
        Duration::from_secs(30),
        || w.agent_holds() == want,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (_, violations) = watch.finish();
    assert!(
        violations.is_empty(),
        "after kill -9: {violations:?}\n{}",
        w.diag()
    );
    let log = w.zt().log_text();
    let after = &log[log_before.min(log.len())..];
    assert_eq!(
        count(after, "received snapshot sent"),
        1,
        "one snapshot after the restart\n{}",
        w.diag()
    );
}

/// Step 4: The primary CNI rewrites its conflist (its own installer: temp file + rename): our
/// entry is put back, and a new mesh pod is captured through the repaired chain.
fn conflist_rewrite(w: &World) {
    let tmp = Path::new(NODE_CONFLIST).with_extension("conflist.tmp");
    std::fs::write(&tmp, &w.conflist_before).expect("write primary's conflist");
    std::fs::rename(&tmp, NODE_CONFLIST).expect("rename over the conflist");
    let t = Instant::now();
    w.wait("entry repaired", Duration::from_secs(10), chained_last);
    eprintln!("conflist rewritten -> repaired: {:?}", t.elapsed());
    w.create_pod(MESH, "after-rewrite", true);
    let p = w.wait_pod_ready(MESH, "after-rewrite");
    assert_eq!(restarts(&p), 0, "after-rewrite ran uncaptured");
    w.assert_captured("after-rewrite", &w.netns_of(&p));
}

/// Step 6: The kubelet rebuilds a captured pod's sandbox (its pause process killed): the pod is
/// captured in the new netns, and the old sandbox's DEL does not release it.
fn sandbox_recreated(w: &World, client_ns: &NamedNetns) {
    let web = w.get(MESH, "web").expect("web");
    let old_ns = w.netns_of(&web);
    let procs = pod_processes(&uid(&web));
    let pause: Vec<&Proc> = procs.iter().filter(|p| is_pause(&p.argv)).collect();
    assert_eq!(pause.len(), 1, "web's pause process: {procs:?}");
    let pid = nix::unistd::Pid::from_raw(pause[0].pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the pause");
    let t = Instant::now();
    let mut new = None;
    w.wait("web in a new sandbox, Ready", LONG, || {
        new = w.get(MESH, "web").filter(|p| {
            is_ready(p)
                && pod_ip(p)
                    .and_then(|ip| netns_with_ip(&ip))
                    .is_some_and(|n| n != old_ns.name())
        });
        new.is_some()
    });
    eprintln!(
        "pause killed -> web Ready in a new sandbox: {:?}",
        t.elapsed()
    );
    let new = new.expect("web");
    let new_ns = w.netns_of(&new);
    w.assert_captured("web (new sandbox)", &new_ns);
    // The old sandbox is torn down (its DEL) by now or soon; the pod stays captured after.
    w.wait("old sandbox netns gone", LONG, || {
        !Path::new(NETNS_DIR).join(old_ns.name()).exists()
    });
    std::thread::sleep(Duration::from_secs(3));
    w.assert_captured("web after the old sandbox's DEL", &new_ns);
    assert!(
        w.agent_holds().iter().any(|p| p == &format!("{MESH}/web")),
        "the agent released web\n{}",
        w.diag()
    );
    assert_eq!(
        w.get(MESH, "web").and_then(|p| annotation(&p)).as_deref(),
        Some("enabled")
    );
    w.assert_inbound(client_ns, &new);
}

/// Step 5: helm uninstall: entry and binary gone from the node, new pods start, nothing of ours
/// left on the host (files, nft tables, sockets).
fn uninstall(w: &mut World) {
    w.helm(&["uninstall", RELEASE, "-n", SYSTEM_NS])
        .expect("helm uninstall");
    w.installed = false;
    w.wait("agent pod gone", LONG, || w.agent_pods_count() == 0);
    assert!(!chained_last(), "entry still chained");
    assert_eq!(
        conf_files_naming_us(),
        Vec::<PathBuf>::new(),
        "conflists naming us"
    );
    assert_eq!(bin_files_of_ours(), Vec::<PathBuf>::new(), "our binaries");
    let tables: Vec<String> = host_nft_tables()
        .into_iter()
        .filter(|t| t.contains("ambient") || t.contains("istio"))
        .collect();
    assert!(tables.is_empty(), "host nft tables left: {tables:?}");
    let socks: Vec<PathBuf> = [RUN_DIR, "/var/run/ztunnel"]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        })
        .collect();
    assert!(socks.is_empty(), "sockets left: {socks:?}");
    // New pods start, also in the mesh namespace (nothing captures them now).
    let api = w.pods(MESH);
    let pod = pod_manifest("post-uninstall", false, true);
    w.rt.block_on(async move { api.create(&PostParams::default(), &pod).await })
        .expect("create post-uninstall");
    let p = w.wait_pod_ready(MESH, "post-uninstall");
    w.assert_not_captured("post-uninstall", &w.netns_of(&p));
}

/// Figures: created → Ready through the kubelet, mesh vs plain pods, alternating (same run).
/// No readiness probe: Ready is the container running, not a probe period's rounding.
fn pod_start_figures(w: &World) -> BTreeMap<&'static str, Vec<Duration>> {
    let mut out: BTreeMap<&'static str, Vec<Duration>> = BTreeMap::new();
    for i in 0..BENCH_PODS {
        for (kind, ns) in [("mesh", MESH), ("plain", PLAIN)] {
            let name = format!("bench-{kind}-{i}");
            let t = Instant::now();
            w.create_pod_with(ns, &name, kind == "mesh", false);
            let ready = wait_for(LONG, || w.get(ns, &name).as_ref().is_some_and(is_ready));
            assert!(ready, "{ns}/{name} not Ready\n{}", w.diag());
            out.entry(kind).or_default().push(t.elapsed());
        }
    }
    let (m50, m99) = (pct(&out["mesh"], 50), pct(&out["mesh"], 99));
    let (p50, p99) = (pct(&out["plain"], 50), pct(&out["plain"], 99));
    eprintln!(
        "pod start created->Ready through the kubelet ({BENCH_PODS} each, alternating): \
         mesh p50 {m50:.0} ms p99 {m99:.0} ms; plain p50 {p50:.0} ms p99 {p99:.0} ms; \
         difference p50 {:.0} ms p99 {:.0} ms",
        m50 - p50,
        m99 - p99
    );
    if let Some(f) = std::env::var_os("NODE_BENCH_OUT") {
        let ms = |v: &[Duration]| {
            v.iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>()
        };
        let v = json!({
            "pods_each": BENCH_PODS,
            "mesh_ms": {"p50": m50, "p99": m99, "all": ms(&out["mesh"])},
            "plain_ms": {"p50": p50, "p99": p99, "all": ms(&out["plain"])},
        });
        let _ = std::fs::write(f, v.to_string());
    }
    out
}

/// `conflist` with Istio's `istio-cni` entry chained last, as istio-cni's installer writes it.
fn with_istio_cni_entry(conflist: &str) -> String {
    let mut v: Value = serde_json::from_str(conflist).expect("node conflist is JSON");
    v["plugins"].as_array_mut().expect("plugins").push(json!({
        "type": "istio-cni",
        "log_level": "info",
        "log_uds_address": "/var/run/istio-cni/log.sock",
        "cni_event_address": "/var/run/istio-cni/pluginevent.sock",
        "ambient_enabled": true,
        "exclude_namespaces": ["kube-system"],
        "kubernetes": {
            "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
            "cni_bin_dir": "/opt/cni/bin"
        }
    }));
    serde_json::to_string_pretty(&v).expect("conflist")
}

/// Replaces the node's conflist in one rename (as CNI installers do).
fn write_conflist(text: &str) -> std::io::Result<()> {
    let tmp = Path::new(NODE_CONFLIST).with_extension("conflist.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, NODE_CONFLIST)
}

#[test]
fn node_lifecycle_install_upgrade_crash_repair_sandbox_uninstall() {
    let Some(peer) = node_peer("node_lifecycle_install_upgrade_crash_repair_sandbox_uninstall")
    else {
        return;
    };
    let mut w = World::new(peer);
    let t = Instant::now();
    eprintln!("== 1. install");
    let (_client, client_ns) = install(&mut w);
    eprintln!("== 2. upgrade ({:?})", t.elapsed());
    upgrade(&w, &client_ns);
    eprintln!("== 3. crash ({:?})", t.elapsed());
    crash(&w);
    eprintln!(
        "== 4. the primary rewrites its conflist ({:?})",
        t.elapsed()
    );
    conflist_rewrite(&w);
    eprintln!("== figures ({:?})", t.elapsed());
    pod_start_figures(&w);
    eprintln!("== 6. sandbox recreated ({:?})", t.elapsed());
    sandbox_recreated(&w, &client_ns);
    eprintln!("== 7. sidecar pods ({:?})", t.elapsed());
    sidecar::side_by_side(&mut w, &client_ns);
    sidecar::race_repaired(&mut w, &client_ns);
    eprintln!("== 5. uninstall ({:?})", t.elapsed());
    uninstall(&mut w);
    eprintln!("== done ({:?})", t.elapsed());
}
