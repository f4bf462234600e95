#!/usr/bin/env bash
# Runs every benchmark and writes BENCHMARKS.md (the one command; run as root:
# the benches make network namespaces and load rules).
#   scripts/bench.sh            # full run
#   ZTUNNEL_BIN=/path/ztunnel scripts/bench.sh   # also the real-ztunnel interop bench, if present
#   scripts/bench.sh --only kube_add             # rerun one bench, replace its section
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# The plugin and the agent as shipped (the image's static musl builds; skipped with a note
# when the target is missing). The benches exec the agent named by AMBIENT_CNI_AGENT.
if rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl; then
    # One package per build, as scripts/image.sh does: built together, the plugin would get the
    # agent's dependency features (cargo unifies them) and grow.
    cargo build --release -p ambient-cni-agent --target x86_64-unknown-linux-musl
    cargo build --release -p ambient-cni --target x86_64-unknown-linux-musl
    export AMBIENT_CNI_AGENT="${AMBIENT_CNI_AGENT:-$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/release/ambient-cni-agent}"
else
    echo "bench: x86_64-unknown-linux-musl not installed; measuring the glibc plugin and agent builds" >&2
fi
# The benches exec these from target/release.
cargo build --release -p ambient-cni -p ambient-cni-agent -p ambient-cni-tests --bins
exec "$CARGO_TARGET_DIR/release/bench-report" --root . --out BENCHMARKS.md "$@"
