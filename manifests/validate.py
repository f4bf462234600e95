#!/usr/bin/env python3
"""Validate rendered ambient-cni manifests (run by validate.sh).

usage: validate.py [--dry-run-server] LABEL=FILE...

Each FILE is a multi-document YAML stream. Every object is checked against the Kubernetes
OpenAPI schema (strict, oldest and newest bundled versions), and the stream must hold exactly
the contract's objects with the contract's RBAC and DaemonSet security shape. With
--dry-run-server, every object is also sent to the API server of $KUBECONFIG with
?dryRun=All (server-side validation and admission, nothing persisted), and the RBAC is applied
for real under unique names and checked as the ServiceAccount itself (SelfSubjectAccessReview;
$KUBE_PEER_DIR/kubeconfig-for gives its token), then deleted.
"""

import base64
import json
import os
import ssl
import sys
import tempfile
import http.client
import urllib.parse

import yaml
import kubernetes_validate
from kubernetes_validate.utils import ValidationError, SchemaNotFoundError, InvalidSchemaError

SCHEMA_VERSIONS = ["1.25.0", "1.37.0"]

# (apiGroup, resource, verb): exactly these, nothing else.
EXPECTED_RBAC = {
    ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
    ("", "namespaces", "get"), ("", "namespaces", "list"), ("", "namespaces", "watch"),
    ("", "pods/status", "patch"),
    ("", "events", "create"), ("events.k8s.io", "events", "create"),
}
# The namespaced Role: `get` on our own DaemonSet only (the uninstall-or-upgrade check at SIGTERM).
EXPECTED_ROLE_RULES = [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                        "resourceNames": ["ambient-cni-node"], "verbs": ["get"]}]
EXPECTED_KINDS = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Role", "RoleBinding",
                  "ServiceAccount"]
# At most one of each, when values ask for it (GKE's quota for system-node-critical pods).
OPTIONAL_KINDS = ["ResourceQuota"]
EXPECTED_CAPS = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE"}
EXPECTED_HOST_PATHS = {"/proc", "/var/run/ambient-cni", "/var/run/ztunnel", "/run/xtables.lock"}

failures = []


def fail(label, msg):
    failures.append(f"{label}: {msg}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def check_schema(label, obj):
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    for v in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(obj, v, strict=True)
        except ValidationError as e:
            fail(label, f"{name} invalid for Kubernetes {v}: {e.message} at {'.'.join(map(str, e.path))}")
        except (SchemaNotFoundError, InvalidSchemaError) as e:
            fail(label, f"{name}: no schema for Kubernetes {v}: {e}")


def check_rbac(label, role):
    got = set()
    for rule in role.get("rules", []):
        if rule.get("resourceNames") or rule.get("nonResourceURLs"):
            fail(label, f"unexpected rule shape {rule}")
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    got.add((g, r, v))
    if got != EXPECTED_RBAC:
        fail(label, f"RBAC differs from the contract: extra {sorted(got - EXPECTED_RBAC)}, "
                    f"missing {sorted(EXPECTED_RBAC - got)}")


def check_daemonset(label, ds, objs):
    if ds["metadata"]["name"] != "ambient-cni-node":
        fail(label, "DaemonSet must be named ambient-cni-node")
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"].get("labels", {})
    if labels.get("istio.io/dataplane-mode") != "none":
        fail(label, "pod label istio.io/dataplane-mode: none missing")
    sel = ds["spec"]["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        fail(label, "selector does not match the pod labels")
    if spec.get("hostNetwork") is not True:
        fail(label, "hostNetwork must be true")
    if spec.get("serviceAccountName") != "ambient-cni":
        fail(label, "serviceAccountName must be ambient-cni")
    tol = spec.get("tolerations", [])
    if not any(t.get("operator") == "Exists" and "key" not in t and t.get("effect") == "NoSchedule" for t in tol) \
            or not any(t.get("operator") == "Exists" and "key" not in t and t.get("effect") == "NoExecute" for t in tol):
        fail(label, "must tolerate every NoSchedule and NoExecute taint")
    (c,) = spec["containers"]
    if c.get("args") != ["run"]:
        fail(label, f"container args must be [run], got {c.get('args')}")
    sc = c.get("securityContext", {})
    if sc.get("privileged") is not False:
        fail(label, "container must set privileged: false")
    caps = sc.get("capabilities", {})
    if caps.get("drop") != ["ALL"] or set(caps.get("add", [])) != EXPECTED_CAPS:
        fail(label, f"capabilities must drop ALL and add exactly {sorted(EXPECTED_CAPS)}: {caps}")
    env = {e["name"]: e for e in c.get("env", [])}
    # The probes go where HEALTH_ADDR listens (loopback by default; else the pod IP, which is
    # the node's IP under hostNetwork).
    health = env.get("HEALTH_ADDR", {}).get("value", "")
    host, _, port = health.rpartition(":")
    want_host = "127.0.0.1" if host == "127.0.0.1" else None
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or str(get.get("port")) != port or get.get("host") != want_host:
            fail(label, f"{probe} must be httpGet {want_host or '<pod IP>'}:{port}{path} (HEALTH_ADDR {health}), got {get}")
    # Istio's tooling finds the node agent by this label; Prometheus by the annotations.
    if labels.get("k8s-app") != "istio-cni-node":
        fail(label, "pod label k8s-app: istio-cni-node missing")
    ann = pod["metadata"].get("annotations", {})
    if ann.get(f"container.apparmor.security.beta.kubernetes.io/{c['name']}") != "unconfined" \
            and sc.get("appArmorProfile", {}).get("type") != "Unconfined":
        fail(label, "the container must be AppArmor-unconfined (annotation or appArmorProfile)")
    if ann.get("prometheus.io/scrape") == "true":
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ann.get("prometheus.io/port") != str(ports.get("metrics")) or ann.get("prometheus.io/path") != "/metrics":
            fail(label, f"prometheus.io annotations do not match the metrics port {ports}: {ann}")
    if spec.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(label, "the pod must set securityContext.seccompProfile.type: RuntimeDefault")
    # The DaemonSet the agent reads at SIGTERM.
    for name, value in (("DAEMONSET_NAME", ds["metadata"]["name"]),):
        if env.get(name, {}).get("value") != value:
            fail(label, f"env {name} must be {value!r}, got {env.get(name)}")
    if not health:
        fail(label, "env HEALTH_ADDR missing")
    for name, field in (("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"),
                        ("POD_NAMESPACE", "metadata.namespace"), ("HOST_IP", "status.hostIP")):
        if env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
            fail(label, f"env {name} must come from the downward API {field}")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    host_paths = {v["hostPath"]["path"] for v in vols.values() if "hostPath" in v}
    if not EXPECTED_HOST_PATHS <= host_paths or len(host_paths) != len(EXPECTED_HOST_PATHS) + 3:
        fail(label, f"unexpected host paths {sorted(host_paths)}")
    if set(mounts) != set(vols):
        fail(label, f"volumes and mounts differ: {sorted(set(mounts) ^ set(vols))}")
    proc = [m for m in mounts.values() if m["mountPath"] == "/host/proc"]
    if not proc or not proc[0].get("readOnly"):
        fail(label, "/proc must be mounted read-only at /host/proc")
    netns = mounts.get("cni-netns-dir", {})
    if netns.get("mountPropagation") != "HostToContainer":
        fail(label, "the netns dir needs mountPropagation HostToContainer")
    cms = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    for ref in c.get("envFrom", []):
        if ref.get("configMapRef", {}).get("name") not in cms:
            fail(label, f"envFrom references a missing ConfigMap {ref}")


def check_stream(label, objs):
    kinds = sorted(o["kind"] for o in objs if o["kind"] not in OPTIONAL_KINDS)
    if kinds != EXPECTED_KINDS:
        fail(label, f"expected one each of {EXPECTED_KINDS}, got {kinds}")
    for k in OPTIONAL_KINDS:
        if sum(o["kind"] == k for o in objs) > 1:
            fail(label, f"more than one {k}")
    for o in objs:
        check_schema(label, o)
        if o["kind"] == "ClusterRole":
            check_rbac(label, o)
        if o["kind"] == "DaemonSet":
            check_daemonset(label, o, objs)
        if o["kind"] == "Role" and o.get("rules") != EXPECTED_ROLE_RULES:
            fail(label, f"Role rules differ from the contract: {o.get('rules')}")
        if o["kind"] == "RoleBinding":
            sa = [s for s in o.get("subjects", []) if s.get("kind") == "ServiceAccount"]
            if [s.get("name") for s in sa] != ["ambient-cni"] or o["roleRef"] != {
                    "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ambient-cni"}:
                fail(label, "RoleBinding must bind Role ambient-cni to ServiceAccount ambient-cni only")
        if o["kind"] == "ClusterRoleBinding":
            sa = [s for s in o.get("subjects", []) if s.get("kind") == "ServiceAccount"]
            if [s.get("name") for s in sa] != ["ambient-cni"] or o["roleRef"]["name"] != "ambient-cni":
                fail(label, "ClusterRoleBinding must bind ClusterRole ambient-cni to ServiceAccount ambient-cni only")


# --- server-side dry run -------------------------------------------------------------------

PATHS = {
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ResourceQuota": ("/api/v1", "resourcequotas", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
}


def kube_client(kubeconfig=None):
    with open(kubeconfig or os.environ["KUBECONFIG"]) as f:
        kc = yaml.safe_load(f)
    ctx_name = kc.get("current-context")
    ctx = next(c["context"] for c in kc["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in kc["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in kc["users"] if u["name"] == ctx["user"])
    tmp = tempfile.mkdtemp(prefix="acni-validate-")

    def material(obj, key):
        if key + "-data" in obj:
            p = os.path.join(tmp, key)
            with open(p, "wb") as f:
                f.write(base64.b64decode(obj[key + "-data"]))
            return p
        return obj.get(key)

    ctx_ssl = ssl.create_default_context(cafile=material(cluster, "certificate-authority"))
    cert, key = material(user, "client-certificate"), material(user, "client-key")
    if cert:
        ctx_ssl.load_cert_chain(cert, key)
    u = urllib.parse.urlparse(cluster["server"])
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if user.get("token"):
        headers["Authorization"] = "Bearer " + user["token"]
    return lambda: http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx_ssl, timeout=20), headers


def dry_run(label, objs, namespace):
    connect, headers = kube_client()
    for o in objs:
        base, plural, namespaced = PATHS[o["kind"]]
        path = f"{base}/namespaces/{namespace}/{plural}" if namespaced else f"{base}/{plural}"
        body = dict(o)
        if namespaced:
            body["metadata"] = dict(o["metadata"], namespace=namespace)
        conn = connect()
        conn.request("POST", path + "?dryRun=All", json.dumps(body), headers)
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        if r.status not in (200, 201):
            msg = text
            try:
                msg = json.loads(text).get("message", text)
            except ValueError:
                pass
            fail(label, f"server rejected {o['kind']}/{o['metadata']['name']}: HTTP {r.status}: {msg}")


def request(connect, headers, method, path, body=None):
    conn = connect()
    conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, text


# (verb, group, resource, subresource, namespaced, allowed[, name])
ACCESS_MATRIX = [
    ("get", "apps", "daemonsets", "", True, True, "ambient-cni-node"),
    ("get", "apps", "daemonsets", "", True, False, "other"),
    ("list", "apps", "daemonsets", "", True, False), ("watch", "apps", "daemonsets", "", True, False),
    ("patch", "apps", "daemonsets", "", True, False, "ambient-cni-node"),
    ("delete", "apps", "daemonsets", "", True, False, "ambient-cni-node"),
    ("get", "", "pods", "", True, True), ("list", "", "pods", "", False, True),
    ("watch", "", "pods", "", False, True), ("list", "", "namespaces", "", False, True),
    ("watch", "", "namespaces", "", False, True), ("get", "", "namespaces", "", False, True),
    ("patch", "", "pods", "status", True, True), ("create", "", "events", "", True, True),
    ("create", "events.k8s.io", "events", "", True, True),
    ("update", "", "pods", "status", True, False), ("patch", "", "pods", "", True, False),
    ("delete", "", "pods", "", True, False), ("create", "", "pods", "", True, False),
    ("get", "", "secrets", "", True, False), ("list", "", "nodes", "", False, False),
    ("get", "apps", "daemonsets", "", True, False), ("patch", "", "namespaces", "", False, False),
    ("list", "", "configmaps", "", True, False), ("create", "", "pods", "exec", True, False),
]


def rbac_live(label, objs):
    """Apply the ServiceAccount, ClusterRole and binding for real (unique names), then ask the
    API server, as that ServiceAccount, what it may do: exactly the contract, nothing more."""
    import subprocess
    connect, headers = kube_client()
    suffix = f"{os.getpid()}-{label}"
    ns = f"acni-validate-{suffix}"[:63]
    role_name = f"ambient-cni-validate-{suffix}"
    role = next(o for o in objs if o["kind"] == "ClusterRole")
    ns_role = next(o for o in objs if o["kind"] == "Role")
    created = []
    try:
        for path, body in (
            ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            (f"/api/v1/namespaces/{ns}/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ambient-cni"}}),
            ("/apis/rbac.authorization.k8s.io/v1/clusterroles",
             dict(role, metadata={"name": role_name})),
            ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
             {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
              "metadata": {"name": role_name},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
              "subjects": [{"kind": "ServiceAccount", "name": "ambient-cni", "namespace": ns}]}),
            (f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
             dict(ns_role, metadata={"name": "ambient-cni"})),
            (f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
             {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
              "metadata": {"name": "ambient-cni"},
              "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ambient-cni"},
              "subjects": [{"kind": "ServiceAccount", "name": "ambient-cni", "namespace": ns}]}),
        ):
            status, text = request(connect, headers, "POST", path, body)
            if status not in (200, 201):
                fail(label, f"creating {path}: HTTP {status}: {text[:200]}")
                return
            created.append(f"{path}/{body['metadata']['name']}")
        sa_kc = subprocess.run([os.path.join(os.environ["KUBE_PEER_DIR"], "kubeconfig-for"), ns, "ambient-cni"],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        sa_connect, sa_headers = kube_client(sa_kc)
        for verb, group, resource, sub, namespaced, allowed, *name in ACCESS_MATRIX:
            attrs = {"verb": verb, "group": group, "resource": resource, "subresource": sub}
            if namespaced:
                attrs["namespace"] = ns
            if name:
                attrs["name"] = name[0]
            review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                      "spec": {"resourceAttributes": attrs}}
            status, text = request(sa_connect, sa_headers, "POST",
                                   "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
            if status not in (200, 201):
                fail(label, f"access review {attrs}: HTTP {status}: {text[:200]}")
                continue
            got = json.loads(text).get("status", {}).get("allowed", False)
            if got != allowed:
                what = f"{verb} {group or 'core'}/{resource}{'/' + sub if sub else ''}{' ' + name[0] if name else ''}"
                fail(label, f"ServiceAccount {'may' if got else 'may not'} {what} (contract: {'allowed' if allowed else 'denied'})")
    finally:
        for path in reversed(created):
            request(connect, headers, "DELETE", path)


def main(argv):
    server = "--dry-run-server" in argv
    args = [a for a in argv if a != "--dry-run-server"]
    if not args:
        print(__doc__)
        return 2
    rbac_seen = set()
    for spec in args:
        label, _, path = spec.partition("=")
        objs = load(path)
        before = len(failures)
        check_stream(label, objs)
        live = ""
        if server:
            dry_run(label, objs, "default")
            # The live RBAC check is the slow part: once per distinct RBAC (values do not change it).
            rbac = json.dumps([(o["kind"], o.get("rules"), o.get("roleRef"), o.get("subjects"))
                               for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role",
                                                              "RoleBinding")], sort_keys=True)
            live = ", server dry-run"
            if rbac not in rbac_seen:
                rbac_live(label, objs)
                rbac_seen.add(rbac)
                live += " + live RBAC"
        status = "ok" if len(failures) == before else "FAILED"
        print(f"  {label}: {len(objs)} objects, schema {'+'.join(SCHEMA_VERSIONS)} strict"
              f"{live}: {status}")
    for f in failures:
        print("FAIL " + f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
