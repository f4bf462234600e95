#!/usr/bin/env bash
# Every test of the project, as root on a Debian machine (`sudo ./scripts/test.sh`).
# One release build is shared by the tests and the benches; the plugin under test
# is the static musl binary that ships.
#
#   scripts/test.sh           everything (what CI runs)
#   scripts/test.sh --quick   the inner loop: fmt, clippy, unit and root tests; no real peers,
#                             no fuzzing, no chart, the small churn run
set -euo pipefail
cd "$(dirname "$0")/.."
quick=
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
if [ -n "$quick" ]; then
  [ -z "${CI:-}" ] || { echo "--quick is for development; CI runs everything" >&2; exit 2; }
  export FUZZ_SECONDS=0 CHURN_FULL=${CHURN_FULL:-0}
fi
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*"; }

# Whatever this script started in the background stops with it, on success or failure.
cleanup() {
  # The fuzz build runs in a session of its own: kill its whole process group.
  if [ -n "${fuzz_build:-}" ]; then kill -- "-$fuzz_build" 2>/dev/null || true; fi
  if [ -n "${peers_build:-}" ]; then kill -- "-$peers_build" 2>/dev/null || true; fi
  if [ -n "${kube_started:-}" ]; then "$peers/kube.sh" stop --dir "$KUBE_PEER_DIR" >/dev/null 2>&1 || true; fi
  if [ -n "${node_started:-}" ]; then "$peers/node.sh" stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
peers=../shared/peers

step "system packages"
./scripts/deps.sh

step "format"
cargo fmt --all -- --check

# The fuzz targets build (instrumented, their own target dir) at low priority from here on:
# cargo-fuzz compiles with one codegen unit, and the peer builds and the tests wait on
# downloads, netns, sockets and timers, so this build mostly fills idle CPU.
fuzz_secs=${FUZZ_SECONDS:-20}
if [ "$fuzz_secs" != 0 ]; then
  step "fuzz build (in the background, nice 19; log target/fuzz-build.log)"
  mkdir -p target
  setsid nice -n 19 ./scripts/fuzz.sh --build-only > target/fuzz-build.log 2>&1 &
  fuzz_build=$!
fi

# The real peers (stock ztunnel, a real kube-apiserver, a real kubelet node) are built by
# ../shared/peers when it is there (CI; cached after the first build), beside our own build:
# all are long, and the peers' downloads and link steps leave CPU idle. One after the other:
# kube.sh and node.sh both apt-get. Elsewhere the interop tests skip unless ZTUNNEL_BIN /
# KUBECONFIG point at yours, and the node lifecycle suite unless NODE_KUBECONFIG does.
if [ -z "$quick" ] && [ -d "$peers" ] && [ -z "${ZTUNNEL_BIN:-}" ]; then
  step "real peers: stock ztunnel, kube-apiserver, kubelet node (building in the background)"
  mkdir -p target
  setsid bash -c 'set -euo pipefail; "$1/ztunnel.sh" | tail -1 > target/peers.env
                  "$1/kube.sh" build; "$1/node.sh" build' \
    _ "$peers" > target/peers-build.log 2>&1 &
  peers_build=$!
fi

step "build (release, all binaries; static musl plugin)"
cargo build --release --workspace --bins
cargo build --release -p ambient-cni --target x86_64-unknown-linux-musl
export AMBIENT_CNI_PLUGIN="$PWD/target/x86_64-unknown-linux-musl/release/ambient-cni"
export AMBIENT_CNI_AGENT="$PWD/target/release/ambient-cni-agent"

if [ -z "$quick" ]; then
  step "image (scripts/image.sh: static binaries, no registry)"
  ./scripts/image.sh target/ambient-cni-image.tar
fi

if [ -n "${peers_build:-}" ]; then
  step "real peers: waiting for their build (log target/peers-build.log)"
  if ! wait "$peers_build"; then
    peers_build=; tail -40 target/peers-build.log; echo "building the real peers failed"; exit 1
  fi
  peers_build=
  export "$(tail -1 target/peers.env)"
  kube_env=$("$peers/kube.sh" start | tail -2)
  # shellcheck disable=SC2086
  export $kube_env
  kube_started=1
  echo "ZTUNNEL_BIN=$ZTUNNEL_BIN KUBECONFIG=$KUBECONFIG"
fi
export ZTUNNEL_STANDIN_BIN="$PWD/target/release/ztunnel-standin"

step "lints"
cargo clippy --release --workspace --all-targets -- -D warnings

step "tests"
# The churn suite at the size the reliability issue asks for: 300 pods in waves of 30.
export CHURN_FULL="${CHURN_FULL:-1}"
[ "$CHURN_FULL" = 0 ] && unset CHURN_FULL
status=0
# The node lifecycle suite runs on its own below, once the kubelet node is up.
cargo test --release --workspace --no-fail-fast -- --skip node_lifecycle || status=$?

if [ "$fuzz_secs" != 0 ]; then
  step "fuzz: every target for ${fuzz_secs}s (FUZZ_SECONDS; 0 skips)"
  if ! wait "$fuzz_build"; then
    fuzz_build=
    tail -40 target/fuzz-build.log; echo "fuzz build failed"; exit 1
  fi
  fuzz_build=
  ./scripts/fuzz.sh "$fuzz_secs"
fi
[ "$status" -eq 0 ] || { echo "tests failed"; exit "$status"; }

if [ -z "$quick" ] && [ -x manifests/validate.sh ]; then
  step "manifests and Helm chart"
  manifests/validate.sh
fi

# The real kubelet node needs the ports of the kube-apiserver peer (6443): that one stops first.
if [ -z "$quick" ] && [ -d "$peers" ]; then
  step "node lifecycle: our image and chart on a real kubelet node (../shared/peers/node.sh)"
  if [ -n "${kube_started:-}" ]; then
    "$peers/kube.sh" stop --dir "$KUBE_PEER_DIR" >/dev/null; kube_started=
  fi
  "$peers/node.sh" build >/dev/null   # built in the background above; 0 s when cached
  node_started=1
  node_kc=$("$peers/node.sh" start --node | tail -1)
  export NODE_KUBECONFIG=${node_kc#KUBECONFIG=}
  helm_line=$("$peers/helm.sh" | tail -1)
  export HELM_BIN=${helm_line#HELM_BIN=}
  export AMBIENT_CNI_IMAGE_TAR="$PWD/target/ambient-cni-image.tar"
  export NODE_BENCH_OUT="$PWD/target/node-pod-start.json"
  node_status=0
  cargo test --release -p ambient-cni-tests --test node_lifecycle -- --nocapture || node_status=$?
  "$peers/node.sh" stop >/dev/null; node_started=
  [ "$node_status" -eq 0 ] || { echo "node lifecycle suite failed"; exit "$node_status"; }
fi

step "leftovers"
left=$(ip netns list 2>/dev/null || true)
if [ -n "$left" ]; then
  echo "network namespaces left behind by the tests:"; echo "$left"; exit 1
fi
echo "none"
