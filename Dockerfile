# syntax=docker/dockerfile:1
#
# Podium operator image: a static (musl) binary on distroless/static, running as non-root.
#
#   docker build -t ghcr.io/podium-dev/podium:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/podium-dev/podium:0.1.0 .
#
# The Rust target follows the build platform's architecture (uname -m), so a multi-platform
# buildx build compiles natively per platform (under emulation where needed).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
# musl-gcc for crates with C parts (ring, used by rustls and rcgen).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    set -eux; \
    target="$(uname -m)-unknown-linux-musl"; \
    cargo build --release --locked --target "$target" -p podium --bin podium; \
    install -D -m 0755 "target/$target/release/podium" /out/podium
# The binary must be static (distroless/static has no libc) and must start.
RUN set -eux; \
    if ldd /out/podium 2>/dev/null | grep -q '=>'; then echo "podium is not static" >&2; exit 1; fi; \
    /out/podium --help >/dev/null

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="podium" \
      org.opencontainers.image.description="Leader election as a service for Kubernetes pods" \
      org.opencontainers.image.source="https://github.com/podium-dev/podium" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/podium /podium
# distroless "nonroot" is uid/gid 65532; the Helm chart runs it with the same ids.
USER 65532:65532
# /healthz, /readyz and /metrics (podium run --http-addr 0.0.0.0:8080).
EXPOSE 8080
ENTRYPOINT ["/podium"]
CMD ["run"]
