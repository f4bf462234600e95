#!/usr/bin/env bash
# Installs the system packages and Rust targets the demo and the tests need
# (Debian, as root). Does nothing that is already there.
set -euo pipefail
pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || pkgs+=("$2"); }
need iptables iptables
need nft nftables
need ip iproute2
need musl-gcc musl-tools
need ps procps
need pip3 python3-pip
need g++ g++  # libFuzzer (cargo-fuzz) is C++
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || pkgs+=(containernetworking-plugins)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "installing: ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ca-certificates "${pkgs[@]}" >/dev/null
fi
if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
  rustup component list --installed | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
fi
