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
    render chart-default
    render chart-owned-gke --set istioOwnedCNIConfig=true --set cniBinDir=/home/kubernetes/bin \
        --set excludeNamespaces=null --set rulesBackend=nftables --set ambient.ipv6=false \
        --set ambient.dnsCapture=false --set-string env.HOST_PROBE_SNAT_IP=169.254.7.127
    render chart-k3s --set cniConfDir=/var/lib/rancher/k3s/agent/etc/cni/net.d \
        --set cniBinDir=/var/lib/rancher/k3s/data/cni --set cniNetnsDir=/var/run/docker/netns \
        --set rulesBackend=iptables --set cniConfFileName=10-flannel.conflist \
        --set 'excludeNamespaces={kube-system,monitoring}' --set image.tag=dev
    # Settings we do not support must refuse to render.
    for bad in "chained=false" "rulesBackend=ebpf"; do
        if "$helm" template ambient-cni "$chart" --set "$bad" >/dev/null 2>&1; then
            die "chart rendered with unsupported --set $bad"
        fi
    done
    # Non-default values must reach the output.
    grep -q 'OWNED_CONF: "02-ambient-cni.conflist"' "$work/chart-owned-gke.yaml" || die "owned mode not rendered"
    grep -q 'EXCLUDE_NAMESPACES: "-"' "$work/chart-owned-gke.yaml" || die "empty excludeNamespaces not rendered as -"
    grep -q 'path: /home/kubernetes/bin' "$work/chart-owned-gke.yaml" || die "cniBinDir not rendered"
    grep -q 'EXCLUDE_NAMESPACES: "kube-system,monitoring"' "$work/chart-k3s.yaml" || die "excludeNamespaces not joined"
    grep -q 'mountPath: /var/run/docker/netns' "$work/chart-k3s.yaml" || die "cniNetnsDir not rendered"
fi

say "validating: ${inputs[*]##*/}"
"$venv/bin/python" "$here/validate.py" "${server[@]}" "${inputs[@]}"
say "manifests OK"
