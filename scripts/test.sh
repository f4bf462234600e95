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

# The real peers (stock ztunnel, a real kube-apiserver) are built by ../shared/peers when it
# is there (CI; cached after the first build), beside our own build: both are long, and the
# peers' downloads and link steps leave CPU idle. Elsewhere the interop tests skip unless
# ZTUNNEL_BIN / KUBECONFIG point at yours.
if [ -z "$quick" ] && [ -d "$peers" ] && [ -z "${ZTUNNEL_BIN:-}" ]; then
  step "real peers: stock ztunnel and kube-apiserver (building in the background)"
  mkdir -p target
  setsid bash -c 'set -euo pipefail; "$1/ztunnel.sh" | tail -1 > target/peers.env; "$1/kube.sh" build' \
    _ "$peers" > target/peers-build.log 2>&1 &
  peers_build=$!
fi

step "build (release, all binaries; static musl plugin)"
cargo build --release --workspace --bins
cargo build --release -p ambient-cni --target x86_64-unknown-linux-musl
export AMBIENT_CNI_PLUGIN="$PWD/target/x86_64-unknown-linux-musl/release/ambient-cni"
export AMBIENT_CNI_AGENT="$PWD/target/release/ambient-cni-agent"

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
cargo test --release --workspace --no-fail-fast || status=$?

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

step "leftovers"
left=$(ip netns list 2>/dev/null || true)
if [ -n "$left" ]; then
  echo "network namespaces left behind by the tests:"; echo "$left"; exit 1
fi
echo "none"
