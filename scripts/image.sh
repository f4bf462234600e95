#!/usr/bin/env bash
# Builds the ambient-cni container image from this checkout without pulling anything: the two
# static (musl) binaries on an empty base, written as a docker-archive tar that
# `ctr -n k8s.io images import`, `docker load` and `podman load` all read.
#
#   scripts/image.sh OUT.tar [--tag REF] [--no-build]
#
#   --tag REF    the image reference (default localhost/ambient-cni:<workspace version>, the
#                chart's default image.repository and appVersion)
#   --no-build   use the binaries already in $CARGO_TARGET_DIR (default target/)
#
# The same files at the same paths as the Dockerfile's default target (`runtime`):
#   /usr/local/bin/ambient-cni-agent   the entrypoint (`run` is the command)
#   /opt/ambient-cni/bin/ambient-cni   the plugin the installer copies onto the host
#   /tmp                               (the chart mounts an emptyDir there)
# Reproducible: fixed mtimes (0), owners (0:0) and modes, sorted entries, a fixed creation
# date; the same binaries give the same image ID. Prints the image ID and size last.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 OUT.tar [--tag REF] [--no-build]" >&2; exit 2; }
out=
tag=
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || usage; tag=$2; shift 2 ;;
    --no-build) build=; shift ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "image.sh: no workspace version in Cargo.toml" >&2; exit 1; }
tag=${tag:-localhost/ambient-cni:$version}
case "$tag" in
  *:*) ;;
  *) echo "image.sh: --tag needs REPOSITORY:TAG, got $tag" >&2; exit 2 ;;
esac

musl=x86_64-unknown-linux-musl
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "$build" ]; then
  # Two builds, not one: cargo unifies the features of packages built together, and the
  # plugin would carry the agent's (a bigger binary copied onto every host).
  cargo build --release --locked --target "$musl" -p ambient-cni
  cargo build --release --locked --target "$musl" -p ambient-cni-agent
fi
bin_dir=$target_dir/$musl/release
for b in ambient-cni ambient-cni-agent; do
  [ -x "$bin_dir/$b" ] || { echo "image.sh: $bin_dir/$b missing (build it, or drop --no-build)" >&2; exit 1; }
  # An empty base has no libc: anything dynamically linked would not start.
  if LC_ALL=C readelf -lW "$bin_dir/$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    echo "image.sh: $bin_dir/$b is dynamically linked; the image needs static binaries" >&2; exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
install -d -m 0755 "$root/usr/local/bin" "$root/opt/ambient-cni/bin"
install -d -m 1777 "$root/tmp"
install -m 0755 "$bin_dir/ambient-cni-agent" "$root/usr/local/bin/ambient-cni-agent"
install -m 0755 "$bin_dir/ambient-cni" "$root/opt/ambient-cni/bin/ambient-cni"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu \
  -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir "$work/image" "$work/image/$diff_id"
mv "$work/layer.tar" "$work/image/$diff_id/layer.tar"

# The image config (OCI/docker: same keys). USER 0:0 as the Dockerfile: the DaemonSet runs it as
# root with a minimal capability set.
cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"User":"0:0","Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":["/usr/local/bin/ambient-cni-agent"],"Cmd":["run"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"ambient-cni","org.opencontainers.image.version":"$version"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"scripts/image.sh"}]}
EOF
config_sha=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/image/$config_sha.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]\n' \
  "$config_sha" "$tag" "$diff_id" >"$work/image/manifest.json"

mkdir -p "$(dirname "$out")"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu \
  -C "$work/image" -cf "$out.tmp" manifest.json "$config_sha.json" "$diff_id"
mv "$out.tmp" "$out"
size=$(stat -c %s "$work/image/$diff_id/layer.tar")
echo "image $tag: $out"
echo "IMAGE_ID=sha256:$config_sha"
echo "IMAGE_SIZE_BYTES=$size"
