#!/usr/bin/env bash
# Validate the plain manifests and the Helm chart (default and non-default values):
# Kubernetes OpenAPI schema (strict), the contract's exact RBAC, the DaemonSet's shape, and,
# when a Kubernetes API server is at hand ($KUBECONFIG + $KUBE_PEER_DIR from
# ../shared/peers/kube.sh), a server-side dry run of every object.
#
# Installs what it needs: a Python venv with kubernetes-validate (PyPI; schemas are bundled, so
# it works offline once installed) and the real helm CLI via ../shared/peers/helm.sh.
# Without ../shared/peers: helm is skipped with a message, unless CI is set (then it fails).
# Server dry-run without $KUBECONFIG: skipped with a message, unless CI is set (then it fails;
# VALIDATE_SKIP_SERVER=1 opts out explicitly).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
peers="$repo/../shared/peers"
chart="$here/charts/ambient-cni"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ambient-cni-validate"
venv="$cache/venv"
kv_version="1.37.0"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf '%s\n' "$*" >&2; }
die() { say "validate.sh: $*"; exit 1; }

# --- tools ---------------------------------------------------------------------------------
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    say "installing kubernetes-validate $kv_version into $venv"
    command -v python3 >/dev/null || die "python3 is required"
    python3 -m venv "$venv" 2>/dev/null || {
        # Debian's python3 splits venv out.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            die "python3 -m venv failed (install python3-venv)"
        fi
    }
    "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kv_version"
fi

helm=""
if [ -x "$peers/helm.sh" ]; then
    helm_line=$("$peers/helm.sh" | tail -1)
    helm=${helm_line#HELM_BIN=}
    [ -x "$helm" ] || die "helm.sh did not give a helm binary: $helm_line"
elif [ -n "${CI:-}" ]; then
    die "$peers/helm.sh not found and CI is set: cannot render the chart"
else
    say "SKIP helm: $peers/helm.sh not found (see ../shared/peers/README.md); validating the plain YAML only"
fi

server=()
if [ -n "${KUBECONFIG:-}" ] && [ -n "${KUBE_PEER_DIR:-}" ]; then
    server=(--dry-run-server)
elif [ -n "${CI:-}" ] && [ -z "${VALIDATE_SKIP_SERVER:-}" ]; then
    die "KUBECONFIG/KUBE_PEER_DIR unset and CI is set: start ../shared/peers/kube.sh first (or VALIDATE_SKIP_SERVER=1)"
else
    say "SKIP server dry-run: KUBECONFIG/KUBE_PEER_DIR unset (see ../shared/peers/README.md)"
fi

# --- render --------------------------------------------------------------------------------
inputs=("plain=$here/ambient-cni.yaml")
if [ -n "$helm" ]; then
    "$helm" lint --strict "$chart" >"$work/lint.log" 2>&1 || { cat "$work/lint.log" >&2; die "helm lint failed"; }
    render() { # label, helm args...
        local label=$1; shift
        "$helm" template ambient-cni "$chart" --namespace istio-system "$@" >"$work/$label.yaml" \
            || die "helm template failed for $label"
        inputs+=("$label=$work/$label.yaml")
    }
    want() { # label, fixed string that must be in its render
        grep -qF -- "$2" "$work/$1.yaml" || die "$1: expected \"$2\" in the render"
    }
    render chart-default
    want chart-default 'value: "127.0.0.1:8000"'
    render chart-owned-gke --set istioOwnedCNIConfig=true --set cniBinDir=/home/kubernetes/bin \
        --set excludeNamespaces=null --set rulesBackend=nftables --set ambient.ipv6=false \
        --set ambient.dnsCapture=false --set-string env.HOST_PROBE_SNAT_IP=169.254.7.127
    render chart-k3s --set cniConfDir=/var/lib/rancher/k3s/agent/etc/cni/net.d \
        --set cniBinDir=/var/lib/rancher/k3s/data/cni --set cniNetnsDir=/var/run/docker/netns \
        --set rulesBackend=iptables --set cniConfFileName=10-flannel.conflist \
        --set 'excludeNamespaces={kube-system,monitoring}' --set image.tag=dev
    # Istio's platform profiles (global.platform): each renders with its paths / extras.
    for p in gke k3d k3s microk8s minikube openshift; do
        render "platform-$p" --set "global.platform=$p"
    done
    want platform-gke 'path: /home/kubernetes/bin'
    want platform-gke 'kind: ResourceQuota'
    want platform-k3d 'path: /var/lib/rancher/k3s/agent/etc/cni/net.d'
    want platform-k3s 'path: /var/lib/rancher/k3s/data/cni'
    want platform-microk8s 'path: /var/snap/microk8s/current/args/cni-network'
    want platform-minikube 'mountPath: /var/run/docker/netns'
    want platform-openshift 'type: spc_t'
    # Istio's own values files (from its install docs), unchanged.
    for f in "$here"/istio-values/*.yaml; do
        render "istio-$(basename "$f" .yaml)" -f "$f"
    done
    want istio-gke 'kind: ResourceQuota'
    want istio-gke 'path: /home/kubernetes/bin'
    want istio-k3s 'path: /var/lib/rancher/k3s/agent/etc/cni/net.d'
    want istio-k3s-paths 'path: /var/lib/rancher/k3s/data/current/bin/'
    want istio-plain 'path: /opt/cni/bin'
    # GKE detected from the server version when cniBinDir is empty (Istio's GKE profile).
    render gke-detected --set cniBinDir= --kube-version v1.30.1-gke.1000
    want gke-detected 'path: /home/kubernetes/bin'
    # Istio's image forms, log level, nftables switch, security and monitoring knobs.
    render istio-knobs --set image=install-cni --set global.hub=registry.example/mesh \
        --set global.tag=1.24.0 --set global.imagePullPolicy=Always \
        --set 'global.logging.level=default:debug\,cni-agent:info' --set global.logAsJson=true \
        --set global.nativeNftables=true --set seccompProfile.type=RuntimeDefault \
        --set seLinuxOptions.level=s0 --set monitoring.metricsBind=loopback \
        --set monitoring.healthPort=8100 --set monitoring.healthBind=hostIP \
        --set daemonSetLabels.team=mesh --set 'global.imagePullSecrets={regcred}'
    want istio-knobs 'image: "registry.example/mesh/install-cni:1.24.0"'
    want istio-knobs 'imagePullPolicy: Always'
    want istio-knobs 'LOG_LEVEL: "debug"'
    want istio-knobs 'LOG_FORMAT: "json"'
    want istio-knobs 'RULES_BACKEND: "nftables"'
    want istio-knobs 'type: spc_t'
    want istio-knobs 'value: "127.0.0.1:15014"'
    want istio-knobs 'value: "$(HOST_IP):8100"'
    want istio-knobs 'team: mesh'
    want istio-knobs '- name: regcred'
    grep -q 'prometheus.io/scrape' "$work/istio-knobs.yaml" && die "istio-knobs: scrape annotations on a loopback metrics port"
    render image-full --set image=registry.example/ambient-cni:v9
    want image-full 'image: "registry.example/ambient-cni:v9"'
    # appArmorProfile (Kubernetes >= 1.30) instead of the annotation: rendered only (the
    # bundled 1.25 schema and the 1.20 test server do not know the field).
    "$helm" template ambient-cni "$chart" --set useAppArmorAnnotation=false >"$work/apparmor.yaml" \
        || die "helm template failed for useAppArmorAnnotation=false"
    grep -q 'type: Unconfined' "$work/apparmor.yaml" || die "appArmorProfile not rendered"
    grep -q 'container.apparmor' "$work/apparmor.yaml" && die "AppArmor annotation rendered with useAppArmorAnnotation=false"
    # global.resourceScope: only cluster-scoped / only namespaced objects.
    kinds() { "$helm" template ambient-cni "$chart" --set "global.resourceScope=$1" | sed -n 's/^kind: //p' | sort | tr '\n' ' '; }
    [ "$(kinds cluster)" = "ClusterRole ClusterRoleBinding " ] || die "resourceScope=cluster rendered: $(kinds cluster)"
    [ "$(kinds namespace)" = "ConfigMap DaemonSet Role RoleBinding ServiceAccount " ] || die "resourceScope=namespace rendered: $(kinds namespace)"
    # What we do not support must refuse to render, naming the key and why.
    refuse() { # expected message part, helm args...
        local msg=$1 out; shift
        if out=$("$helm" template ambient-cni "$chart" "$@" 2>&1); then
            die "chart rendered with unsupported $*"
        fi
        grep -qF -- "$msg" <<<"$out" || die "refusing $* did not say \"$msg\": $out"
    }
    refuse "chained=false: ambient-cni is always a chained CNI plugin" --set chained=false
    refuse "provider=multus: only the default provider" --set provider=multus
    refuse "profile=demo: ambient-cni does ambient only" --set profile=demo
    refuse "ambient.enabled=false: ambient-cni does ambient only" --set ambient.enabled=false
    refuse "ambient.configDir: not supported" --set ambient.configDir=/etc/ambient-config
    refuse "ambient.reconcileIptablesOnStartup=false: not supported" --set ambient.reconcileIptablesOnStartup=false
    refuse "repair.labelPods=true needs repair.brokenPodLabelKey" --set repair.labelPods=true --set repair.brokenPodLabelKey=
    # The repair controller's modes: Istio's REPAIR_* keys; `delete` on pods only in delete mode.
    want chart-default 'REPAIR_REPAIR_PODS: "true"'
    grep -q 'verbs: \["delete"\]' "$work/chart-default.yaml" && die "default render grants delete on pods"
    "$helm" template ambient-cni "$chart" --set repair.repairPods=false --set repair.deletePods=true >"$work/repair-delete.yaml" \
        || die "helm template failed for repair.deletePods"
    grep -q 'verbs: \["delete"\]' "$work/repair-delete.yaml" || die "repair.deletePods: no delete on pods"
    grep -q 'REPAIR_DELETE_PODS: "true"' "$work/repair-delete.yaml" || die "repair.deletePods not rendered"
    refuse "global.networkPolicy.enabled=true: not supported" --set global.networkPolicy.enabled=true
    refuse "defaults: Istio's old prefix" --set defaults.hub=x
    refuse "_internal_defaults_do_not_set: Istio's internal key" --set _internal_defaults_do_not_set.hub=x
    refuse "rulesBackend" --set rulesBackend=ebpf
    refuse "at '/global/platform': value must be one of" --set global.platform=eks
    refuse "additional properties 'meshID' not allowed" --set global.meshID=mesh1
    refuse "additional properties 'cniBinDri' not allowed" --set cniBinDri=/opt/cni/bin
    refuse "logging.level: \"default:verbose\" is not an Istio log level" --set logging.level=default:verbose
    # Non-default values must reach the output.
    grep -q 'OWNED_CONF: "02-ambient-cni.conflist"' "$work/chart-owned-gke.yaml" || die "owned mode not rendered"
    grep -q 'EXCLUDE_NAMESPACES: "-"' "$work/chart-owned-gke.yaml" || die "empty excludeNamespaces not rendered as -"
    grep -q 'path: /home/kubernetes/bin' "$work/chart-owned-gke.yaml" || die "cniBinDir not rendered"
    grep -q 'EXCLUDE_NAMESPACES: "kube-system,monitoring"' "$work/chart-k3s.yaml" || die "excludeNamespaces not joined"
    grep -q 'mountPath: /var/run/docker/netns' "$work/chart-k3s.yaml" || die "cniNetnsDir not rendered"
fi

# The kustomize overlay into kube-system: the bindings' subject follows the ServiceAccount.
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    kubectl kustomize "$repo/install/kustomize/kube-system" >"$work/kustomize-kube-system.yaml" \
        || die "kubectl kustomize install/kustomize/kube-system failed"
    if grep -q 'namespace: istio-system' "$work/kustomize-kube-system.yaml"; then
        die "kustomize overlay kube-system left an object or subject in istio-system"
    fi
    inputs+=("kustomize-kube-system=$work/kustomize-kube-system.yaml")
else
    say "SKIP kustomize overlay: no kubectl with kustomize"
fi

say "validating: ${inputs[*]##*/}"
"$venv/bin/python" "$here/validate.py" "${server[@]}" "${inputs[@]}"
say "manifests OK"
