# syntax=docker/dockerfile:1
# user-metadata-auth container image.
#   docker build -t user-metadata-auth:0.1.0 .
#   docker run --rm -p 127.0.0.1:8089:8089 -e UMA_REDIS__URL=redis://redis:6379 user-metadata-auth:0.1.0
# The bundled config and seed are in /etc/user-metadata-auth/; mount your own over that directory
# (Kubernetes: the uma-config ConfigMap, see deploy/kubernetes/). Every key can be overridden with a
# UMA_ environment variable (README, Configuration).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds; the binary is copied out of
# the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/user-metadata-auth /usr/local/bin/user-metadata-auth

FROM debian:bookworm-slim
# ca-certificates for TLS clients; tzdata for the IANA zone of tdl.timezone (jiff reads
# /usr/share/zoneinfo).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/*
# A numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 uma \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin uma
COPY --from=builder /usr/local/bin/user-metadata-auth /usr/local/bin/user-metadata-auth
COPY config/ /etc/user-metadata-auth/
ENV UMA_SEED__PATH=/etc/user-metadata-auth/seed.yaml
# All interfaces inside the container: the published port and Kubernetes probes reach the pod's
# address, not its loopback.
ENV UMA_LISTEN=0.0.0.0:8089
USER 10001:10001
EXPOSE 8089
# The image has no curl; bash's /dev/tcp asks /healthz on the port of UMA_LISTEN. Kubernetes ignores
# this and uses the probes of deploy/kubernetes/deployment.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${UMA_LISTEN##*:} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 status <&3 && [[ $status == *' 200 '* ]]"]
# SIGTERM (docker stop, Kubernetes) drains in-flight requests and flushes pending TDL counters.
STOPSIGNAL SIGTERM
ENTRYPOINT ["user-metadata-auth"]
CMD ["serve", "--config", "/etc/user-metadata-auth/default.toml"]
