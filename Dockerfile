# syntax=docker/dockerfile:1
#
# oci-tag-proxy on distroless/static: one static binary, CA certificates, no libc, no shell.
#
#   docker build -t oci-tag-proxy .
#   docker buildx build --platform linux/amd64,linux/arm64 -t oci-tag-proxy .
#   docker run -p 8080:8080 -v tag-cache:/var/cache/oci-tag-proxy oci-tag-proxy
#
# The binary is made by scripts/build-static (release profile, glibc linked in statically with
# +crt-static), the same script ./scripts/test runs before it checks that binary in an empty root
# filesystem (tests/it/container.rs). glibc rather than musl: it is the toolchain's own target,
# and static glibc still resolves host names through /etc/hosts and DNS (its `files` and `dns`
# lookups are built into libc), which the test proves.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- builder: runs on the build machine's platform and cross-compiles for the target one ----
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# The Rust target for TARGETARCH and, when it is not the builder's own, a cross C toolchain
# with a static glibc for it (ring has C and assembly; the linker is gcc).
# hadolint ignore=DL3008
RUN case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu;  packages=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross) ;; \
      arm64) triple=aarch64-unknown-linux-gnu; packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;; \
      *) echo "unsupported TARGETARCH: $TARGETARCH" >&2; exit 1 ;; \
    esac; \
    echo "$triple" > /rust-target; \
    if [ "$triple" != "$(rustc -vV | sed -n 's/^host: //p')" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends "${packages[@]}" \
      && rm -rf /var/lib/apt/lists/* \
      && rustup target add "$triple"; \
    fi

COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY scripts/build-static ./scripts/build-static

# The binary, and the cache directory owned by distroless's `nonroot` user (65532), so that a
# named volume mounted there starts out writable.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=oci-tag-proxy-target-${TARGETARCH},sharing=locked \
    binary="$(scripts/build-static "$(cat /rust-target)" | tail -n 1)" \
    && install -D -m 0755 "$binary" /out/oci-tag-proxy \
    && install -d -m 0750 -o 65532 -g 65532 /out/var-cache/oci-tag-proxy

# ---- runtime: distroless static, non-root ----
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /out/oci-tag-proxy /usr/local/bin/oci-tag-proxy
# The directory is copied as an entry (not created on the way to a destination), so --chown
# applies to it too.
COPY --from=builder --chown=65532:65532 /out/var-cache/ /var/cache/
ENV TAG_PROXY_DIR=/var/cache/oci-tag-proxy
VOLUME ["/var/cache/oci-tag-proxy"]
USER 65532:65532
EXPOSE 8080
# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself; compose runs
# `oci-tag-proxy healthcheck` (see docker-compose.yml). Both need no shell.
ENTRYPOINT ["/usr/local/bin/oci-tag-proxy"]
