# syntax=docker/dockerfile:1
# The regionsync image: the release binary on a slim Debian runtime, run as
# uid/gid 10001, no shell needed (ENTRYPOINT is the binary itself).
#
#   docker build -t <your-registry>/regionsync:$(git describe --always) .
#   podman build -t <your-registry>/regionsync:<tag> .
#
# The base images are arguments so that a mirror can be named:
#   --build-arg BUILD_BASE=<mirror>/rust:1.95-slim-bookworm
#   --build-arg RUNTIME_BASE=<mirror>/debian:bookworm-slim
# The runtime base must have the same or a newer glibc than the build base
# (both Debian 12 here). deploy/k8s/README.md says how it is deployed.
# Security scan (checkov, make k8s-check), checks skipped on purpose:
#checkov:skip=CKV_DOCKER_7:Both FROM lines name their base through an ARG whose default has a fixed version tag (1.95-slim-bookworm, bookworm-slim); the scanner cannot see through the ARG.
#checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the metrics port (deploy/k8s/base/deployment.yaml), and a HEALTHCHECK would need a shell or an HTTP client in the image.
ARG BUILD_BASE=rust:1.95-slim-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${BUILD_BASE} AS build
# librdkafka and mimalloc are compiled from C sources by their -sys crates
# (make, a C/C++ compiler, zlib headers).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The library embeds schemas/regionsync.sql (regionsync setup) at compile time.
COPY schemas ./schemas
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin regionsync \
 && install -D -m 0755 target/release/regionsync /out/regionsync

FROM ${RUNTIME_BASE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="regionsync" \
      org.opencontainers.image.description="Apply side of multi-region PostgreSQL replication: mirrored Debezium CDC from Kafka into PostgreSQL, exactly once in effect" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.documentation="deploy/k8s/README.md"
# The binary only: it links glibc, libgcc and libz, all in the base. Its
# HTTP client (rustls) loads the system's CA roots when it starts and panics
# without any, and the slim base has none: so Debian's CA bundle comes too.
COPY --from=build --chown=0:0 --chmod=0755 /out/regionsync /usr/local/bin/regionsync
COPY --from=build --chown=0:0 --chmod=0644 /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# Config and secrets are mounted by the manifests (deploy/k8s/base/
# deployment.yaml); the image itself writes nowhere.
USER 10001:10001
WORKDIR /
# The metrics port of the manifests (metrics.listen = "0.0.0.0:9464").
EXPOSE 9464
ENV REGIONSYNC_CONFIG=/etc/regionsync/regionsync.toml
ENTRYPOINT ["regionsync"]
CMD ["run"]
