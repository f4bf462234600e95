//! Sidecar mode on the real node (issue 20): a pod shaped like one Istio's injector makes with
//! CNI on (the `sidecar.istio.io/status` annotation, an `istio-validation` init container and
//! an `istio-proxy` container, both from our image as uid 1337: `validate-sidecar` is Istio's
//! check, `validate-sidecar --serve` a proxy stand-in answering with each connection's
//! original destination port).
//!
//! Side by side: the sidecar pod starts with Istio's rules in its netns (its validation passes
//! the first time) and no ztunnel; the ambient pod keeps ztunnel's capture and no sidecar rules.
//! The race: with the chart uninstalled (a node whose DaemonSet pod is not there yet) the same
//! pod fails its validation with 126; once the chart is back, the agent repairs it in place and
//! it reaches Running without being recreated.

use super::*;
use k8s_openapi::api::core::v1::Event;

/// The namespace of the sidecar pods (no ambient label: Istio's injection is per pod here).
pub const SIDECAR_NS: &str = "lc-sidecar";
/// The proxy uid of Istio's injector.
const PROXY_UID: i64 = 1337;

/// An injected-shaped pod: `app` (busybox httpd on 8080), `istio-proxy` (our image, the
/// stand-in), `istio-validation` (our image, Istio's check with a 2 s probe timeout).
fn sidecar_manifest(name: &str, image: &str) -> Pod {
    let as_proxy = json!({
        "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true,
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}
    });
    let agent = "/usr/local/bin/ambient-cni-agent";
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {
                "sidecar.istio.io/status":
                    "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"]}"
            }
        },
        "spec": {
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "enableServiceLinks": false,
            "initContainers": [{
                "name": "istio-validation", "image": image, "imagePullPolicy": "Never",
                "command": [agent], "args": ["validate-sidecar", "--probe-timeout", "2"],
                "securityContext": as_proxy
            }],
            "containers": [
                {
                    "name": "app", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "command": ["sh", "-c", format!(
                        "mkdir -p /tmp/www && echo ok-{name} >/tmp/www/index.html && exec httpd -f -p {APP_PORT} -h /tmp/www"
                    )]
                },
                {
                    "name": "istio-proxy", "image": image, "imagePullPolicy": "Never",
                    "command": [agent], "args": ["validate-sidecar", "--serve"],
                    "securityContext": as_proxy
                }
            ]
        }
    }))
    .expect("sidecar pod manifest")
}

/// The `istio-validation` container's status.
fn validation(p: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "istio-validation")
        .cloned()
}

/// True when the validation ended with `code`, now or last time.
fn validation_exited(p: &Pod, code: i32) -> bool {
    validation(p).is_some_and(|c| {
        [c.state.as_ref(), c.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .any(|t| t.exit_code == code)
    })
}

/// Istio's sidecar rules are in the netns (either backend's readback).
fn has_sidecar_rules(ns: &NamedNetns) -> bool {
    let nft = String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).into_owned();
    let ipt = String::from_utf8_lossy(&ns.exec(&["iptables-save"]).stdout).into_owned();
    nft.contains("istio-proxy-nat") || ipt.contains(":ISTIO_INBOUND")
}

/// Our ambient rules are in the netns (either backend's readback).
fn has_ambient_rules(ns: &NamedNetns) -> bool {
    let nft = String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).into_owned();
    let ipt = String::from_utf8_lossy(&ns.exec(&["iptables-save"]).stdout).into_owned();
    nft.contains("istio-ambient") || ipt.contains(":ISTIO_PRERT")
}

impl World {
    fn create_sidecar_pod(&self, name: &str) {
        let api = self.pods(SIDECAR_NS);
        let pod = sidecar_manifest(name, &self.image);
        self.rt
            .block_on(async move { api.create(&PostParams::default(), &pod).await })
            .unwrap_or_else(|e| panic!("create pod {SIDECAR_NS}/{name}: {e}"));
    }

    /// The sidecar pod's capture and nothing else: Istio's rules, no ambient rules, no
    /// ztunnel listener; inbound from the client lands on the proxy's 15006 with its port.
    fn assert_sidecar_captured(&self, what: &str, p: &Pod, client: &NamedNetns) {
        let ns = self.netns_of(p);
        assert!(
            has_sidecar_rules(&ns),
            "{what}: no sidecar rules\n{}",
            self.diag()
        );
        assert!(!has_ambient_rules(&ns), "{what}: has ambient rules");
        let zt = self.zt().pid();
        assert!(
            !port_owners(&ns, 15008).contains(&zt) && !port_owners(&ns, 15001).contains(&zt),
            "{what}: ztunnel listens in it"
        );
        let to = format!("{}:{APP_PORT}", pod_ip(p).expect("sidecar pod IP"));
        let (_, said) = connect_from(client, &to)
            .unwrap_or_else(|e| panic!("{what}: connect {to} from the client: {e}"));
        assert_eq!(
            said,
            APP_PORT.to_string(),
            "{what}: inbound to {to} not redirected to the proxy"
        );
    }

    /// Events on `ns/name` as (type, reason, message).
    fn events_of(&self, ns: &str, name: &str) -> Vec<(String, String, String)> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let lp = ListParams::default().fields(&format!("involvedObject.name={name}"));
        self.rt
            .block_on(async move { api.list(&lp).await })
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// A sidecar pod next to the ambient `web`: each gets its own capture and nothing else.
pub fn side_by_side(w: &mut World, client_ns: &NamedNetns) {
    w.namespace(SIDECAR_NS, false);
    let t = Instant::now();
    w.create_sidecar_pod("sc-web");
    let p = w.wait_pod_ready(SIDECAR_NS, "sc-web");
    eprintln!("sidecar pod created -> Ready: {:?}", t.elapsed());
    let v = validation(&p).expect("istio-validation status");
    assert_eq!(
        v.restart_count,
        0,
        "the validation failed before passing: {v:?}\n{}",
        w.diag()
    );
    w.assert_sidecar_captured("sc-web", &p, client_ns);
    let web = w.get(MESH, "web").expect("web");
    let web_ns = w.netns_of(&web);
    w.assert_captured("web next to a sidecar pod", &web_ns);
    assert!(!has_sidecar_rules(&web_ns), "web: has sidecar rules");
    assert_eq!(annotation(&p), None, "a sidecar pod is not ambient");
}

/// The race: a sidecar pod started while no plugin was chained fails validation (126); the
/// agent, once installed, repairs it in place and it reaches Running (same pod UID).
pub fn race_repaired(w: &mut World, client_ns: &NamedNetns) {
    let t = Instant::now();
    w.helm(&["uninstall", RELEASE, "-n", SYSTEM_NS])
        .expect("helm uninstall");
    w.installed = false;
    w.wait("agent pod gone", LONG, || w.agent_pods_count() == 0);
    w.wait("entry unchained", Duration::from_secs(10), || {
        !chained_last()
    });
    w.create_sidecar_pod("sc-race");
    let mut last = None;
    w.wait(
        "sc-race's validation fails with 126",
        Duration::from_secs(60),
        || {
            last = w.get(SIDECAR_NS, "sc-race");
            last.as_ref().is_some_and(|p| validation_exited(p, 126))
        },
    );
    let broken = last.expect("sc-race");
    eprintln!(
        "no plugin chained -> sc-race's validation exits 126: {:?}",
        t.elapsed()
    );
    assert!(!is_ready(&broken));

    let back = Instant::now();
    w.installed = true;
    w.helm_release("install", &w.image.clone(), &[])
        .expect("helm install again");
    w.wait_agent_ready(&w.image);
    let p = w.wait_pod_ready(SIDECAR_NS, "sc-race");
    eprintln!(
        "chart back -> sc-race repaired and Ready: {:?} (sidecar race step {:?})",
        back.elapsed(),
        t.elapsed()
    );
    assert_eq!(uid(&p), uid(&broken), "repaired in place, not recreated");
    let events = w.events_of(SIDECAR_NS, "sc-race");
    assert!(
        events
            .iter()
            .any(|(ty, reason, _)| ty == "Normal" && reason == "RepairBrokenPod"),
        "no Normal RepairBrokenPod event: {events:?}"
    );
    w.assert_sidecar_captured("sc-race (repaired)", &p, client_ns);
}
