# syntax=docker/dockerfile:1
# ambient-cni image: static musl builds of the plugin (`ambient-cni`) and the node agent
# (`ambient-cni-agent`) on an empty base. `scripts/image.sh OUT.tar` builds the same image
# (same files, paths, modes, entrypoint) without docker and without pulling anything.
#
#   docker build -t localhost/ambient-cni:0.1.0 .                          # nftables backend, smallest
#   docker build --target with-iptables -t localhost/ambient-cni:0.1.0-iptables .   # adds iptables/nft binaries
#
# The agent needs the iptables binaries only for RULES_BACKEND=iptables (and for `auto` on
# nodes where it picks iptables); the default image has none, so use the with-iptables target
# (or rulesBackend=nftables) there.

ARG RUST_VERSION=1.90

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
    && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
    && cargo build --release --locked --target "$target" -p ambient-cni \
    && cargo build --release --locked --target "$target" -p ambient-cni-agent \
    && mkdir -p /out/rootfs/usr/local/bin /out/rootfs/opt/ambient-cni/bin \
    && install -d -m 1777 /out/rootfs/tmp \
    && install -m 0755 "target/$target/release/ambient-cni-agent" /out/rootfs/usr/local/bin/ \
    && install -m 0755 "target/$target/release/ambient-cni" /out/rootfs/opt/ambient-cni/bin/

# Optional: Debian slim with iptables (legacy + nft) and nft, for the iptables backend.
FROM debian:12-slim AS with-iptables
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/rootfs/ /
ENTRYPOINT ["/usr/local/bin/ambient-cni-agent"]
CMD ["run"]

# Default: the two static binaries and /tmp, nothing else (what scripts/image.sh writes). The
# installer copies the plugin from /opt/ambient-cni/bin/ambient-cni into the host's CNI bin dir.
FROM scratch AS runtime
COPY --from=build /out/rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
# The DaemonSet runs it as root (runAsUser: 0) with a minimal capability set.
USER 0:0
ENTRYPOINT ["/usr/local/bin/ambient-cni-agent"]
CMD ["run"]
