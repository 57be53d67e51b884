#!/usr/bin/env bash
# make image-check: build the Dockerfile with podman on this machine and run
# the image the way deploy/k8s/base/deployment.yaml does, against the local
# stack's eu-west-1 (make stack-up; make k8s-check first, for target/k8s/).
# Not part of make test: the image's build stage is a full release build.
#
# No base image can be pulled here, so two local stand-ins are made first,
# under names of their own, and passed as the Dockerfile's base arguments:
#   localhost/regionsync-standin/debian:bookworm-slim  Debian bookworm minbase
#     without CA material, as slim is (tools/rootfs.sh);
#   localhost/regionsync-standin/rust:bookworm          that plus this
#     machine's Rust toolchain (rustc --print sysroot), with cargo told to
#     trust this machine's CA bundle, mounted at /run/host-ca.crt for the
#     build only (so the image's bundle stays Debian's).
# Podman runs with runc (crun refuses this machine's hybrid cgroup layout)
# and with ulimits no higher than this shell's (raising them is not allowed).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
TOOLS=$ROOT/target/k8s-tools
OUT=$ROOT/target/k8s
REGION=eu-west-1
IMAGE=localhost/regionsync:image-check
SLIM=localhost/regionsync-standin/debian:bookworm-slim
RUST=localhost/regionsync-standin/rust:bookworm
say() { echo "[image-check] $*"; }
fail() { echo "[image-check] FAIL: $*" >&2; exit 1; }
# shellcheck source=../../local/env.sh
source deploy/local/env.sh
[ -f "$OUT/$REGION.yaml" ] || fail "$OUT/$REGION.yaml missing: run make k8s-check first"
start=$SECONDS

missing=()
for t in podman runc debootstrap; do command -v $t >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)

# shellcheck source=rootfs.sh
source deploy/k8s/tools/rootfs.sh
if ! "${PODMAN[@]}" image exists "$SLIM" || [ "$ROOTFS/.complete-v2" -nt "$TOOLS/standin-slim.stamp" ]; then
  say "importing $SLIM from $ROOTFS"
  tar -C "$ROOTFS" --exclude=./.complete-v2 --exclude=./usr/local/bin/regionsync --exclude=./etc/regionsync \
    --exclude=./etc/ssl/certs -c . | "${PODMAN[@]}" import -q - "$SLIM" >/dev/null
  "${PODMAN[@]}" rmi -f "$RUST" >/dev/null 2>&1 || true
  touch "$TOOLS/standin-slim.stamp"
fi
if ! "${PODMAN[@]}" image exists "$RUST"; then
  sysroot=$(rustc --print sysroot)
  say "making $RUST from $SLIM and $sysroot"
  printf 'FROM %s\nCOPY . /usr/local/rust\nENV CARGO_HOME=/usr/local/cargo CARGO_HTTP_CAINFO=/run/host-ca.crt PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' "$SLIM" \
    | "${PODMAN[@]}" build -q "${LIMITS[@]}" -t "$RUST" -f - "$sysroot" >/dev/null
fi

# The build stage fetches crates over HTTPS with this machine's CA bundle
# (mounted aside for the build only; the image gets Debian's own).
say "podman build (the release build inside takes a while the first time)"
t0=$SECONDS
"${PODMAN[@]}" build --network host "${LIMITS[@]}" \
  -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
  --build-arg BUILD_BASE="$RUST" --build-arg RUNTIME_BASE="$SLIM" \
  --build-arg REVISION="$(git rev-parse HEAD)" -t "$IMAGE" . >"$TOOLS/image-build.log" 2>&1 \
  || { tail -20 "$TOOLS/image-build.log"; fail "podman build (log: $TOOLS/image-build.log)"; }
say "built $IMAGE in $((SECONDS - t0)) s, $("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# What the image says about itself.
user=$("${PODMAN[@]}" image inspect -f '{{.Config.User}}' "$IMAGE")
entry=$("${PODMAN[@]}" image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")
title=$("${PODMAN[@]}" image inspect -f '{{index .Config.Labels "org.opencontainers.image.title"}}' "$IMAGE")
[ "$user" = 10001:10001 ] || fail "image user is $user"
[ "$entry" = '["regionsync"]' ] || fail "entrypoint is $entry"
[ "$title" = regionsync ] || fail "no OCI title label"
ca=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" --entrypoint /usr/bin/wc "$IMAGE" -c /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1)
[ "${ca:-0}" -gt 100000 ] || fail "the image's CA bundle has $ca bytes"
base_ca=$( { "${PODMAN[@]}" run --rm "${LIMITS[@]}" --entrypoint /bin/ls "$SLIM" -A /etc/ssl/certs 2>/dev/null || true; } | wc -l)
[ "$base_ca" -eq 0 ] || fail "the slim stand-in has CA material; it should have none"
say "image: user $user, entrypoint $entry, OCI labels, CA bundle $ca bytes (the base has none)"

# The manifest's settings (the same reading as runtime_check.sh's).
eval "$("$TOOLS/venv/bin/python" deploy/k8s/tools/manifest_env.py "$OUT/$REGION.yaml")"
work=$(mktemp -d /tmp/image-check.XXXXXX)
name=regionsync-image-check-$$
cleanup() { "${PODMAN[@]}" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/config" "$work/secret"
printf '%s' "$M_TOML" >"$work/config/regionsync.toml"
printf '%s' "$REGIONSYNC_PASSWORD" >"$work/secret/$M_PW_FILE"
chmod 0444 "$work/config/regionsync.toml"; chgrp "$M_GID" "$work/secret/$M_PW_FILE"; chmod 0440 "$work/secret/$M_PW_FILE"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval "set -- $M_ARGS"
# As the pod: its uid, read-only root, no capabilities, no privilege
# escalation, config and password read-only at the manifest's paths. Only
# addresses are overridden, as in runtime_check.sh: it consumes nothing.
"${PODMAN[@]}" run -d --name "$name" --network host "${LIMITS[@]}" \
  --read-only --user "$M_UID:$M_GID" --cap-drop ALL --security-opt no-new-privileges \
  -v "$work/config:$M_CONFIG_DIR:ro" -v "$work/secret:$M_PW_DIR:ro" \
  -e REGIONSYNC_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT_B" \
  -e REGIONSYNC_SCHEMA_REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7" \
  -e REGIONSYNC_POSTGRES__HOST=127.0.0.1 -e REGIONSYNC_POSTGRES__PORT="$PG_PORT_B" \
  -e REGIONSYNC_METRICS__LISTEN="127.0.0.1:$port" -e REGIONSYNC_CONSUMER_GROUP="regionsync-image-check-$$" \
  -e 'REGIONSYNC_SOURCE_REGIONS=["ap-south-1"]' -e REGIONSYNC_TOMBSTONE_GRACE=3650d \
  "$IMAGE" "$@" >/dev/null
deadline=$((SECONDS + 60))
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name")" = true ] \
    || { "${PODMAN[@]}" logs "$name" | tail -20; fail "the container exited before serving /healthz"; }
  [ $SECONDS -lt $deadline ] || { "${PODMAN[@]}" logs "$name" | tail -20; fail "no /healthz within 60 s"; }
  sleep 0.5
done
pid=$("${PODMAN[@]}" inspect -f '{{.State.Pid}}' "$name")
grep -qE "^Uid:\s+$M_UID\s" "/proc/$pid/status" || fail "uid: $(grep ^Uid "/proc/$pid/status")"
grep -qE "^CapEff:\s+0+$" "/proc/$pid/status" || fail "capabilities: $(grep ^CapEff "/proc/$pid/status")"
ready=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")
case "$ready" in 200|503) ;; *) fail "/readyz answered $ready";; esac
deadline=$((SECONDS + 30))
until curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^regionsync_'; do
  [ $SECONDS -lt $deadline ] || fail "/metrics has no regionsync_ series"
  sleep 1
done
"${PODMAN[@]}" logs "$name" 2>&1 | grep -q consuming || fail "the worker did not reach 'consuming'"
say "container: /healthz 200, /readyz $ready, /metrics served, uid $M_UID, no capabilities"
t0=$(date +%s.%N)
"${PODMAN[@]}" stop -t "$M_GRACE" "$name" >/dev/null
took=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f}')")
code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || { "${PODMAN[@]}" logs "$name" | tail -5; fail "exit code $code after SIGTERM"; }
"${PODMAN[@]}" logs "$name" 2>&1 | grep -q "shutting down" || fail "no 'shutting down' in the log"
say "SIGTERM (podman stop): exit 0 in $took s"
say "image check passed in $((SECONDS - start)) s"
