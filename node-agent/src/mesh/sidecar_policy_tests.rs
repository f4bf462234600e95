use super::*;
use crate::mesh::policy::{DATAPLANE_MODE, SIDECAR_STATUS};
use serde_json::{json, Value};

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn ns(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A pod as Istio's injector shapes it with `pilot.cni.enabled=true`: the status
/// annotation, `istio-validation` and `istio-proxy` (uid 1337), an app container.
fn injected(namespace: &str) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": "web", "uid": "u1",
                     "annotations": {SIDECAR_STATUS: "{\"initContainers\":[\"istio-validation\"]}"}},
        "spec": {
            "initContainers": [{"name": "istio-validation", "image": "proxyv2"}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": ISTIO_PROXY, "image": "proxyv2", "args": ["proxy", "sidecar"],
                 "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
            ]
        },
        "status": {"phase": "Pending"}
    })
}

fn with(mut v: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut v);
    v
}

fn proxy_env(v: &mut Value, name: &str, value: &str) {
    v["spec"]["containers"][1]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": name, "value": value}));
}

/// (what, policy, pod, namespace labels, expected mode).
type Case<'a> = (
    &'a str,
    &'a Policy,
    Value,
    &'a BTreeMap<String, String>,
    Mode,
);

#[test]
fn decision_table() {
    let on = Policy::default();
    let off = Policy {
        sidecar_mode: false,
        ..Policy::default()
    };
    let plain = ns(&[]);
    let ambient_ns = ns(&[(DATAPLANE_MODE, "ambient")]);
    let pass = |w| Mode::PassThrough(w);
    let cases: Vec<Case> = vec![
        ("injected pod", &on, injected("shop"), &plain, Mode::Sidecar),
        (
            "injected pod in an ambient namespace stays sidecar",
            &on,
            injected("shop"),
            &ambient_ns,
            Mode::Sidecar,
        ),
        (
            "injected pod labelled ambient stays sidecar",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["labels"] = json!({DATAPLANE_MODE: "ambient"})
            }),
            &plain,
            Mode::Sidecar,
        ),
        (
            "sidecar mode off",
            &off,
            injected("shop"),
            &plain,
            pass(Why::SidecarModeOff),
        ),
        (
            "excluded namespace",
            &on,
            injected("kube-system"),
            &plain,
            pass(Why::NotAmbient(Skip::ExcludedNamespace)),
        ),
        (
            "hostNetwork",
            &on,
            with(injected("shop"), |v| v["spec"]["hostNetwork"] = json!(true)),
            &plain,
            pass(Why::NotAmbient(Skip::HostNetwork)),
        ),
        (
            "terminal",
            &on,
            with(injected("shop"), |v| v["status"]["phase"] = json!("Failed")),
            &plain,
            pass(Why::NotAmbient(Skip::Terminal)),
        ),
        (
            "no status annotation, ambient namespace",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["annotations"] = json!({})
            }),
            &ambient_ns,
            Mode::Ambient,
        ),
        (
            "no status annotation, plain namespace",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["annotations"] = json!({})
            }),
            &plain,
            pass(Why::NotAmbient(Skip::NotSelected)),
        ),
        (
            "native sidecar (istio-proxy as an init container)",
            &on,
            with(injected("shop"), |v| {
                let proxy = v["spec"]["containers"][1].take();
                v["spec"]["containers"] = json!([{"name": "app"}]);
                v["spec"]["initContainers"]
                    .as_array_mut()
                    .unwrap()
                    .push(proxy);
            }),
            &plain,
            Mode::Sidecar,
        ),
        (
            "no istio-proxy",
            &on,
            with(injected("shop"), |v| {
                v["spec"]["containers"] = json!([{"name": "app"}])
            }),
            &plain,
            pass(Why::NoProxy),
        ),
        (
            "istio-init present",
            &on,
            with(injected("shop"), |v| {
                v["spec"]["initContainers"] = json!([{"name": ISTIO_INIT}])
            }),
            &plain,
            pass(Why::IstioInit),
        ),
        (
            "inject=false label",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["labels"] = json!({SIDECAR_INJECT: "false"})
            }),
            &plain,
            pass(Why::InjectDisabled),
        ),
        (
            "inject=false annotation",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["annotations"][SIDECAR_INJECT] = json!("false")
            }),
            &plain,
            pass(Why::InjectDisabled),
        ),
        (
            "label true wins over annotation false",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["labels"] = json!({SIDECAR_INJECT: "true"});
                v["metadata"]["annotations"][SIDECAR_INJECT] = json!("false");
            }),
            &plain,
            Mode::Sidecar,
        ),
        (
            "label false wins over annotation true",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["labels"] = json!({SIDECAR_INJECT: "F"});
                v["metadata"]["annotations"][SIDECAR_INJECT] = json!("true");
            }),
            &plain,
            pass(Why::InjectDisabled),
        ),
        (
            "inject value not a boolean is ignored",
            &on,
            with(injected("shop"), |v| {
                v["metadata"]["labels"] = json!({SIDECAR_INJECT: "no"})
            }),
            &plain,
            Mode::Sidecar,
        ),
        (
            "gateway (proxy router)",
            &on,
            with(injected("shop"), |v| {
                v["spec"]["containers"][1]["args"] = json!(["proxy", "router"])
            }),
            &plain,
            pass(Why::Gateway),
        ),
        (
            "proxy args without a type",
            &on,
            with(injected("shop"), |v| {
                v["spec"]["containers"][1]["args"] = json!(["proxy"])
            }),
            &plain,
            Mode::Sidecar,
        ),
        (
            "DISABLE_ENVOY=true",
            &on,
            with(injected("shop"), |v| proxy_env(v, DISABLE_ENVOY, "true")),
            &plain,
            pass(Why::EnvoyDisabled),
        ),
        (
            "DISABLE_ENVOY=false",
            &on,
            with(injected("shop"), |v| proxy_env(v, DISABLE_ENVOY, "false")),
            &plain,
            Mode::Sidecar,
        ),
    ];
    for (what, policy, v, labels, want) in cases {
        assert_eq!(decide(policy, &pod(v), labels), want, "{what}");
    }
}

#[test]
fn ambient_never_takes_an_injected_pod() {
    let p = Policy::default();
    let v = with(injected("shop"), |v| {
        v["metadata"]["labels"] = json!({DATAPLANE_MODE: "ambient"})
    });
    assert_eq!(
        p.evaluate(&pod(v), &ns(&[(DATAPLANE_MODE, "ambient")])),
        Err(Skip::Sidecar)
    );
}

#[test]
fn inputs_come_from_the_proxy_and_prev_result_first() {
    let v = with(injected("shop"), |v| {
        v["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
            json!("9000");
        v["spec"]["containers"][1]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}));
        v["status"]["podIPs"] = json!([{"ip": "10.9.0.7"}]);
    });
    let p = pod(v);
    let prev: Vec<IpAddr> = vec!["fd00::5".parse().unwrap(), "10.0.0.5".parse().unwrap()];
    let i = sidecar_inputs(&p, &prev);
    assert_eq!(i.pod, "shop/web");
    assert_eq!(i.pod_ips, prev);
    assert_eq!(
        i.annotations
            .get("traffic.sidecar.istio.io/excludeOutboundPorts")
            .map(String::as_str),
        Some("9000")
    );
    assert_eq!(
        i.proxy_env,
        ns(&[("ISTIO_META_DNS_CAPTURE", "true"), ("POD_NAME", "")])
    );
    assert_eq!((i.proxy_uid, i.proxy_gid), (Some(1337), Some(1337)));
    // Without prevResult addresses: the pod status.
    let i = sidecar_inputs(&p, &[]);
    assert_eq!(i.pod_ips, vec!["10.9.0.7".parse::<IpAddr>().unwrap()]);
    // No securityContext: no ids (the rules default them to 1337).
    let bare = with(injected("shop"), |v| {
        v["spec"]["containers"][1]
            .as_object_mut()
            .unwrap()
            .remove("securityContext");
    });
    let i = sidecar_inputs(&pod(bare), &prev);
    assert_eq!((i.proxy_uid, i.proxy_gid), (None, None));
}
