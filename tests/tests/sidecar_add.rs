//! Sidecar mode end to end: sidecar-injected pods (shaped as Istio's injector leaves them
//! with `pilot.cni.enabled=true`) through the real CNI chain (bridge + host-local +
//! ambient-cni), the agent process with a local pod source, the ztunnel stand-in.
//! The rules are read back from the kernel and compared with Istio's own golden.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_cni_tests::cni::{Attachment, Chain};
use ambient_cni_tests::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(15);

/// One agent + stand-in; namespaces `mesh` (ambient) and `shop` (plain).
struct Node {
    dir: TempDir,
    agent: AgentProcess,
    standin: Standin,
    subnet: u8,
    _bridge: HostLink,
    bridge: String,
}

impl Node {
    fn new(backend: &str, subnet: u8) -> Self {
        let dir = TempDir::new("acni-sidecar");
        write_namespace(
            &dir.join("pods"),
            "mesh",
            json!({"istio.io/dataplane-mode": "ambient"}),
        );
        write_namespace(&dir.join("pods"), "shop", json!({}));
        let agent = AgentProcess::start(
            &dir.0,
            &["--rules-backend", backend, "--verify-interval", "0"],
        );
        let standin = Standin::start(&dir.join("ztunnel.sock"), &dir.join("standin.jsonl"), &[]);
        assert!(
            standin.wait_count("snapshot_sent", 1, LONG),
            "stand-in got no snapshot: {:?}",
            standin.events()
        );
        let bridge = unique("acsb");
        Self {
            dir,
            agent,
            standin,
            subnet,
            _bridge: HostLink(bridge.clone()),
            bridge,
        }
    }

    fn chain(&self) -> Chain {
        Chain::bridge_then(
            "1.0.0",
            &self.bridge,
            &format!("10.95.{}.0/24", self.subnet),
            &self.dir.0,
            plugin_entry(&self.dir.join("plugin.sock"), 5000),
        )
    }

    /// Writes `pod` (its uid set to the netns name) and runs the chain ADD in a fresh netns.
    fn add(&self, mut pod: Value) -> (NamedNetns, Attachment, Result<Vec<Value>, (usize, Exec)>) {
        let netns = NamedNetns::new();
        let uid = format!("{}-uid", netns.name());
        pod["metadata"]["uid"] = uid.clone().into();
        write_pod_object(&self.dir.join("pods"), &pod);
        let meta = &pod["metadata"];
        let att = Attachment::pod(
            &netns.path(),
            meta["namespace"].as_str().unwrap(),
            meta["name"].as_str().unwrap(),
            &uid,
        );
        let res = self.chain().add(&att);
        (netns, att, res)
    }

    /// ztunnel (the stand-in) was told about pod `uid`.
    fn ztunnel_knows(&self, uid: &str) -> bool {
        self.standin
            .events_of("add")
            .iter()
            .any(|e| e["uid"] == uid)
    }
}

/// `iptables-save` of a netns, counters and comments dropped.
fn saved(ns: &NamedNetns) -> String {
    let out = ns.exec(&["iptables-save"]);
    assert!(out.status.success(), "{out:?}");
    normalise(&String::from_utf8_lossy(&out.stdout))
}

fn normalise(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            Some(chain) => format!(":{}", chain.split(" [").next().unwrap_or(chain)),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Istio's sidecar goldens: `ISTIO_SIDECAR_GOLDENS_DIR`, or `shared/testdata` beside the checkout.
fn goldens_dir() -> PathBuf {
    std::env::var_os("ISTIO_SIDECAR_GOLDENS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/testdata/istio-goldens-sidecar")
        })
}

/// Asserts `ns` holds exactly what the kernel holds after Istio's golden `name` is loaded
/// into a fresh netns. Without the goldens (a bare clone; never in CI) only Istio's
/// redirect chains are checked.
fn assert_istio_rules(ns: &NamedNetns, name: &str) {
    let got = saved(ns);
    assert!(got.contains("-A OUTPUT -j ISTIO_OUTPUT"), "{got}");
    let file = goldens_dir().join(format!("{name}.txt.golden"));
    if !file.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "Istio's sidecar goldens missing at {}",
            file.display()
        );
        eprintln!("{} missing: checking Istio's chains only", file.display());
        for line in [
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A OUTPUT -j ISTIO_OUTPUT",
        ] {
            assert!(got.lines().any(|l| l == line), "{line} missing:\n{got}");
        }
        return;
    }
    let golden = NamedNetns::new();
    let file = file.display().to_string();
    let out = golden.exec(&["iptables-restore", "--noflush", &file]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(got, saved(&golden), "ours (left) vs Istio's {name} golden");
}

fn has_istio_chains(ns: &NamedNetns) -> bool {
    saved(ns).contains("ISTIO_")
}

/// `nft list tables` of a netns.
fn nft_tables(ns: &NamedNetns) -> String {
    String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).into_owned()
}

/// The sidecar pod holds Istio's sidecar rules and nothing of the ambient capture.
fn assert_sidecar_rules(backend: &str, ns: &NamedNetns) {
    if backend == "iptables" {
        assert_istio_rules(ns, "basic");
    } else {
        // Istio's nft table names (the rules themselves are compared in iptables-rules).
        let tables = nft_tables(ns);
        assert!(tables.contains("table ip istio-proxy-nat"), "{tables}");
        assert!(!tables.contains("istio-ambient"), "{tables}");
        assert!(!has_istio_chains(ns), "{}", saved(ns));
    }
}

#[test]
fn sidecar_and_ambient_pods_side_by_side_each_get_their_own_capture_iptables() {
    if require_root("sidecar_and_ambient_pods_side_by_side_each_get_their_own_capture_iptables") {
        side_by_side("iptables", 1);
    }
}

#[test]
fn sidecar_and_ambient_pods_side_by_side_each_get_their_own_capture_nftables() {
    if require_root("sidecar_and_ambient_pods_side_by_side_each_get_their_own_capture_nftables") {
        side_by_side("nftables", 4);
    }
}

fn side_by_side(backend: &str, subnet: u8) {
    let node = Node::new(backend, subnet);
    let (side, side_att, res) = node.add(injected_pod("mesh", "reviews"));
    let results = res
        .unwrap_or_else(|(i, e)| panic!("ADD plugin {i}: {e:?}\nagent: {}", node.agent.log_text()));
    assert_eq!(results[1], results[0], "output is the prevResult");
    // Istio's rules, exactly (a namespace labelled ambient does not make it ambient).
    assert_sidecar_rules(backend, &side);
    let side_uid = side_att.args.rsplit("K8S_POD_UID=").next().unwrap();

    // An ambient pod beside it: ambient capture only, and ztunnel gets it.
    let mut app = injected_pod("mesh", "ratings");
    app["metadata"]["annotations"] = json!({});
    let (amb, amb_att, res) = node.add(app);
    res.unwrap_or_else(|(i, e)| panic!("ADD plugin {i}: {e:?}\n{}", node.agent.log_text()));
    if backend == "iptables" {
        let amb_rules = saved(&amb);
        assert!(amb_rules.contains("ISTIO_PRERT"), "{amb_rules}");
        assert!(!amb_rules.contains("ISTIO_INBOUND"), "{amb_rules}");
    } else {
        let tables = nft_tables(&amb);
        assert!(tables.contains("istio-ambient-nat"), "{tables}");
        assert!(!tables.contains("istio-proxy"), "{tables}");
    }
    let amb_uid = amb_att.args.rsplit("K8S_POD_UID=").next().unwrap();
    assert!(
        wait_for(LONG, || node.ztunnel_knows(amb_uid)),
        "{:?}",
        node.standin.events()
    );
    assert!(!node.ztunnel_knows(side_uid), "sidecar pod sent to ztunnel");
    assert_sidecar_rules(backend, &side);

    // Re-ADD of the sidecar pod (our plugin again, as a runtime retrying): nothing written.
    let chain = node.chain();
    let entry = chain.conflist["plugins"][1].clone();
    let again = chain.exec_one("ADD", &entry, &side_att, Some(&results[0]));
    assert_eq!(again.code, 0, "{again:?}");
    assert_sidecar_rules(backend, &side);
    let log = node.agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("sidecar redirection") && l.contains("unchanged")),
        "{log}"
    );
    // DEL leaves the rules to die with the netns and succeeds.
    chain.del(&side_att, Some(&results[1])).expect("DEL");
}

#[test]
fn pods_that_are_not_sidecars_to_serve_pass_through_untouched() {
    if !require_root("pods_that_are_not_sidecars_to_serve_pass_through_untouched") {
        return;
    }
    let node = Node::new("iptables", 2);
    let mut inject_off = injected_pod("shop", "inject-off");
    inject_off["metadata"]["labels"] = json!({"sidecar.istio.io/inject": "false"});
    let mut gateway = injected_pod("shop", "gateway");
    gateway["spec"]["containers"][1]["args"] = json!(["proxy", "router"]);
    let mut istio_init = injected_pod("shop", "istio-init");
    istio_init["spec"]["initContainers"] = json!([{"name": "istio-init", "image": "proxyv2"}]);
    let mut no_envoy = injected_pod("shop", "no-envoy");
    no_envoy["spec"]["containers"][1]["env"] = json!([{"name": "DISABLE_ENVOY", "value": "true"}]);
    for pod in [inject_off, gateway, istio_init, no_envoy] {
        let name = pod["metadata"]["name"].clone();
        let (ns, att, res) = node.add(pod);
        let results = res.unwrap_or_else(|(i, e)| {
            panic!("{name}: ADD plugin {i}: {e:?}\n{}", node.agent.log_text())
        });
        assert_eq!(results[1], results[0], "{name}");
        assert!(!has_istio_chains(&ns), "{name}: {}", saved(&ns));
        let uid = att.args.rsplit("K8S_POD_UID=").next().unwrap();
        assert!(!node.ztunnel_knows(uid), "{name}");
    }
}

#[test]
fn a_bad_annotation_fails_the_add_naming_the_key_and_installs_nothing() {
    if !require_root("a_bad_annotation_fails_the_add_naming_the_key_and_installs_nothing") {
        return;
    }
    let node = Node::new("iptables", 3);
    let key = "traffic.sidecar.istio.io/excludeOutboundPorts";
    let mut pod = injected_pod("shop", "bad-ports");
    pod["metadata"]["annotations"][key] = json!("80,http");
    let (ns, _att, res) = node.add(pod);
    let (i, exec) = res.expect_err("ADD must fail");
    assert_eq!(i, 1, "our plugin fails, the bridge did not: {exec:?}");
    let err: Value = serde_json::from_str(&exec.stdout).expect("CNI error JSON");
    assert_eq!(err["code"], 100, "{err}");
    let msg = err["msg"].as_str().unwrap_or_default();
    for want in ["shop/bad-ports", key, "80,http"] {
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
    assert!(!has_istio_chains(&ns), "{}", saved(&ns));
}
