#!/usr/bin/env bash
# The local demo (root, Debian): real netns pods, the real CNI chain, the agent,
# a ztunnel stand-in, and traffic shown captured.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --release --workspace --bins
cargo build --release -p ambient-cni --target x86_64-unknown-linux-musl
# The demo is a development tool (tests/ crate); it runs the agent as a child.
exec ./target/release/ambient-cni-demo \
  --agent "$PWD/target/release/ambient-cni-agent" \
  --plugin "$PWD/target/x86_64-unknown-linux-musl/release/ambient-cni" \
  --standin "$PWD/target/release/ztunnel-standin" "$@"
