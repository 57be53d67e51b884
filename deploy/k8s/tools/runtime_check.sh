#!/usr/bin/env bash
# The image's runtime contract, checked without a container engine: the
# regionsync binary runs the way deploy/k8s/base/deployment.yaml runs it in
# the image, against the local stack's eu-west-1 (make stack-up), and the
# check fails if any of this does not hold:
#   - root filesystem: a Debian bookworm minbase tree without CA material
#     (what the Dockerfile's debian:bookworm-slim runtime holds; made by
#     tools/rootfs.sh from Debian's packages, cached), mounted read-only,
#     with only what the Dockerfile adds: the binary at
#     /usr/local/bin/regionsync and Debian's CA bundle (the worker's HTTP
#     client panics without one); its shared libraries must be there, and
#     no shell starts it;
#   - the uid/gid of the manifest's securityContext, no capabilities,
#     no_new_privs (allowPrivilegeEscalation: false), no writable path;
#   - the rendered ConfigMap's regionsync.toml at /etc/regionsync/ and the
#     password as a file at the manifest's path, both read-only mounts;
#   - the process answers /healthz, /readyz and /metrics on its metrics
#     port, and on SIGTERM exits 0 within terminationGracePeriodSeconds.
# Only addresses are overridden (REGIONSYNC_* variables, as a Secret or the
# pod's env would): the stack's loopback ports, a free metrics port, its own
# consumer group, and a source region the stack does not have, so the
# worker connects to Kafka and PostgreSQL but is assigned no partition and
# writes nothing (tombstone grace set far out so it collects none either).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
TOOLS=$ROOT/target/k8s-tools
OUT=$ROOT/target/k8s
REGION=eu-west-1
BIN=${REGIONSYNC_BIN:-$ROOT/target/debug/regionsync}
say() { echo "[k8s-runtime] $*"; }
fail() { echo "[k8s-runtime] FAIL: $*" >&2; exit 1; }
# shellcheck source=../../local/env.sh
source deploy/local/env.sh

[ -f "$OUT/$REGION.yaml" ] || fail "$OUT/$REGION.yaml missing: run make k8s-check first"
# REGIONSYNC_BIN=target/release/regionsync checks the release binary instead.
[ -n "${REGIONSYNC_BIN:-}" ] || cargo build -q --bin regionsync
[ -x "$BIN" ] || fail "no binary at $BIN"

# --- the runtime base ---------------------------------------------------------
# shellcheck source=rootfs.sh
source deploy/k8s/tools/rootfs.sh

# --- what the manifest says ---------------------------------------------------------
eval "$("$TOOLS/venv/bin/python" deploy/k8s/tools/manifest_env.py "$OUT/$REGION.yaml")"
[ "$M_RO" = true ] || fail "the manifest's root filesystem is not read-only"
say "manifest: uid $M_UID gid $M_GID, read-only root, config in $M_CONFIG_DIR, password at $M_PW_DIR/$M_PW_FILE, args: $M_ARGS"
grep -q "password_file = \"$M_PW_DIR/$M_PW_FILE\"" <<<"$M_TOML" || fail "the config's password_file is not the Secret's mount"

# --- the pod's filesystem, in a private mount namespace -------------------------------------
work=$(mktemp -d /tmp/k8s-runtime.XXXXXX)
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/config" "$work/secret" "$work/root"
printf '%s' "$M_TOML" >"$work/config/regionsync.toml"
printf '%s' "$REGIONSYNC_PASSWORD" >"$work/secret/$M_PW_FILE"
chmod 0444 "$work/config/regionsync.toml"; chmod 0440 "$work/secret/$M_PW_FILE"; chgrp "$M_GID" "$work/secret/$M_PW_FILE"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
group="regionsync-k8s-runtime-$$"

# Mount points the kubelet would create; the cached tree is ours to change.
mkdir -p "$ROOTFS$M_CONFIG_DIR" "$ROOTFS/run/${M_PW_DIR#/var/run/}" "$ROOTFS/usr/local/bin" "$ROOTFS/etc/ssl/certs"
[ -e "$ROOTFS/usr/local/bin/regionsync" ] || : >"$ROOTFS/usr/local/bin/regionsync"
[ -e "$ROOTFS/etc/ssl/certs/ca-certificates.crt" ] || : >"$ROOTFS/etc/ssl/certs/ca-certificates.crt"

cat >"$work/enter.sh" <<'SH'
set -euo pipefail
work=$1 rootfs=$2 bin=$3 cfgdir=$4 pwdir=$5 uid=$6 gid=$7 ca=$8; shift 8
r=$work/root
mount --bind "$rootfs" "$r"
mount --bind "$bin" "$r/usr/local/bin/regionsync"
mount --bind "$ca" "$r/etc/ssl/certs/ca-certificates.crt"
mount --bind "$work/config" "$r$cfgdir"
mount --bind "$work/secret" "$r/run/${pwdir#/var/run/}"
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"
# Read-only, as readOnlyRootFilesystem and the volumes' readOnly make them.
for m in "$r" "$r/usr/local/bin/regionsync" "$r/etc/ssl/certs/ca-certificates.crt" "$r$cfgdir" "$r/run/${pwdir#/var/run/}"; do
  mount -o remount,bind,ro "$m"
done
cd /
exec setpriv --no-new-privs unshare --root="$r" --wd=/ --setgid "$gid" --setuid "$uid" -- "$@"
SH

if [ "${1:-}" = --selftest-writable ]; then
  # For proving the write check can fail: leave the root writable.
  sed -i 's#^for m in "\$r" #for m in #' "$work/enter.sh"
fi

# The worker's environment: nothing from this shell but the overrides.
envs=(
  PATH=/usr/local/bin:/usr/bin:/bin
  RUST_LOG=info,rdkafka=warn
  REGIONSYNC_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT_B
  REGIONSYNC_SCHEMA_REGISTRY__URL=http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7
  REGIONSYNC_POSTGRES__HOST=127.0.0.1
  REGIONSYNC_POSTGRES__PORT=$PG_PORT_B
  REGIONSYNC_METRICS__LISTEN=127.0.0.1:$port
  REGIONSYNC_CONSUMER_GROUP=$group
  "REGIONSYNC_SOURCE_REGIONS=[\"ap-south-1\"]"
  REGIONSYNC_TOMBSTONE_GRACE=3650d
)
run_in_pod() {  # command... : run inside the pod's filesystem as the pod's user
  env -i "${envs[@]}" unshare -m --propagation private --fork \
    bash "$work/enter.sh" "$work" "$ROOTFS" "$BIN" "$M_CONFIG_DIR" "$M_PW_DIR" "$M_UID" "$M_GID" "$CA_BUNDLE" "$@"
}

# No writable path for the pod's user, not even /tmp.
for path in /tmp/probe /probe "$M_CONFIG_DIR/probe" "$M_PW_DIR/probe"; do
  if run_in_pod /usr/bin/touch "$path" 2>"$work/touch.err"; then
    fail "uid $M_UID could write $path in the pod's root filesystem"
  fi
  grep -q "Read-only file system" "$work/touch.err" || fail "touch $path failed otherwise: $(cat "$work/touch.err")"
done
say "uid $M_UID cannot write /tmp, /, $M_CONFIG_DIR or $M_PW_DIR: Read-only file system"

eval "set -- $M_ARGS"
# The image's ENTRYPOINT is the binary; the manifest's args follow it.
run_in_pod /usr/local/bin/regionsync "$@" >"$work/worker.log" 2>&1 &
launcher=$!
# The worker is the launcher's last exec'd descendant: find it by its port.
deadline=$((SECONDS + 60))
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do
  kill -0 "$launcher" 2>/dev/null || { cat "$work/worker.log"; fail "the worker exited before serving /healthz"; }
  [ $SECONDS -lt $deadline ] || { cat "$work/worker.log"; fail "no /healthz on 127.0.0.1:$port within 60 s"; }
  sleep 0.5
done
pid=$(ss -ltnpH "sport = :$port" | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -1)
[ -n "$pid" ] || fail "cannot find the process listening on $port"
say "/healthz answers on 127.0.0.1:$port (pid $pid)"

status=/proc/$pid/status
grep -qE "^Uid:\s+$M_UID\s+$M_UID\s+$M_UID\s+$M_UID$" $status || fail "uid: $(grep ^Uid $status)"
grep -qE "^Gid:\s+$M_GID\s+$M_GID\s+$M_GID\s+$M_GID$" $status || fail "gid: $(grep ^Gid $status)"
grep -qE "^Groups:\s*($M_GID)?\s*$" $status || fail "supplementary groups: $(grep ^Groups $status)"
grep -qE "^CapEff:\s+0+$" $status || fail "capabilities: $(grep ^CapEff $status)"
grep -qE "^CapPrm:\s+0+$" $status || fail "capabilities: $(grep ^CapPrm $status)"
grep -qE "^NoNewPrivs:\s+1$" $status || fail "no_new_privs not set"
[ "$(readlink /proc/$pid/root)" = "$work/root" ] || [ "$(readlink /proc/$pid/root)" = / ] || true
root_opts=$(awk '$5 == "/" {print $6}' /proc/$pid/mountinfo | head -1)
[[ ",$root_opts," == *,ro,* ]] || fail "the worker's / is mounted $root_opts, not read-only"
exe=$(readlink /proc/$pid/exe)
say "runs as $(grep ^Uid $status | awk '{print $2}'):$(grep ^Gid $status | awk '{print $2}'), no capabilities, no_new_privs, / mounted $root_opts, exe $exe"

# Ready or not (no partition of a source region the stack lacks: 503 with a
# reason), /readyz must answer; /metrics must carry the worker's metrics.
ready=$(curl -s -o "$work/readyz" -w '%{http_code}' "http://127.0.0.1:$port/readyz")
case "$ready" in 200|503) ;; *) fail "/readyz answered $ready";; esac
say "/readyz: $ready $(head -c 120 "$work/readyz" | tr '\n' ' ')"
deadline=$((SECONDS + 30))
until curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^regionsync_'; do
  [ $SECONDS -lt $deadline ] || fail "/metrics has no regionsync_ series after 30 s"
  sleep 1
done
say "/metrics: $(curl -sf "http://127.0.0.1:$port/metrics" | grep -c '^regionsync_') regionsync_ samples"
grep -q "consuming" "$work/worker.log" || { cat "$work/worker.log"; fail "the worker did not reach 'consuming' (config, password file or connection)"; }

# SIGTERM, as the kubelet sends it; exit 0 within the grace period.
t0=$(date +%s.%N)
kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do
  elapsed=$(python3 -c "print($(date +%s.%N) - $t0)")
  python3 -c "import sys; sys.exit(0 if $elapsed < $M_GRACE else 1)" || fail "still running ${M_GRACE} s after SIGTERM"
  sleep 0.1
done
rc=0; wait "$launcher" || rc=$?
drain=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f}')")
pid=
[ $rc -eq 0 ] || { tail -5 "$work/worker.log"; fail "exit status $rc after SIGTERM"; }
grep -q "shutting down" "$work/worker.log" || fail "no 'shutting down' in the log"
say "SIGTERM: exited 0 in $drain s (idle worker; grace period ${M_GRACE} s)"
grep -qF "$REGIONSYNC_PASSWORD" "$work/worker.log" && fail "the log shows the password"
say "runtime contract holds"
