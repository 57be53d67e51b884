#!/usr/bin/env bash
# The local two-region stack: real PostgreSQL, Kafka (KRaft), Kafka Connect
# with Debezium, MirrorMaker 2, Apicurio Registry and Prometheus, all on
# loopback. Usage: stack.sh install|up|down|status|workers-up|workers-down
#
#   install       Debian packages (apt-get) and the JVM pieces (Maven, deploy/local/pom.xml,
#                 avro-converter/pom.xml, jdbc-sink/pom.xml)
#   up            install if needed, then start every service behind a readiness
#                 check; a running service is left alone (idempotent). The
#                 regionsync workers are not started by `up`.
#   down          stop the workers (if running), then every service this stack
#                 started, by pid; data is kept
#   status        one line per service: up/down, port, pid, log file
#   workers-up    build regionsync (release) and start one worker per region
#                 (deploy/local/regionsync-<region>.toml) against the running
#                 stack; a running worker is left alone (idempotent)
#   workers-down  stop the workers, by pid
#   region-kill R region R's PostgreSQL (postmaster and every backend), Kafka,
#                 Connect and MirrorMaker 2 killed at once with SIGKILL: a
#                 whole-region failure (tests/region_failure.rs). Data is kept.
#                 MirrorMaker 2 is one process for both directions here, so
#                 both flows stop, as when it runs in the failed region.
#   region-up R   start region R's PostgreSQL, Kafka, Connect (its Debezium
#                 connectors RUNNING again) and MirrorMaker 2, each behind its
#                 readiness check; a running one is left alone
#
# Secured endpoints beside the plain ones: a local CA (target/stack/tls/ca.pem,
# made with openssl on the first `up`) signs a server certificate for localhost
# and 127.0.0.1; PostgreSQL B serves TLS on its usual port (and the role
# regionsync_cert logs in with a client certificate only); Kafka B has a second
# listener, SASL_SSL with SCRAM-SHA-512, on KAFKA_SASL_PORT_B.
#
# Runtime state (data, logs, pids) lives in target/stack/ (STACK_DIR); downloaded JVM
# artifacts in target/dist/ (Maven also caches them in ~/.m2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$ROOT/deploy/local"

# shellcheck source=deploy/local/env.sh
source "$HERE/env.sh"

case "$STACK_DIR" in
  /*) STATE="$STACK_DIR" ;;
  *) STATE="$ROOT/$STACK_DIR" ;;
esac
DIST="$ROOT/target/dist"
LOGS="$STATE/logs"
PIDS="$STATE/pids"

REGIONS=("$REGION_A" "$REGION_B")
JAVA_SMALL=(-Xms64m -XX:+UseSerialGC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=file:$HERE/log4j2.properties")
# The Connect workers run the connectors under benchmark (Debezium, and the
# JDBC sink that make bench-peers compares regionsync with): the JVM's own
# collector and JIT, and the heap Kafka's connect-distributed.sh gives them,
# so that the peer runs as its users would run it.
JAVA_CONNECT=(-Xms256m -Xmx2g -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=file:$HERE/log4j2.properties")

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# --- per-region facts ---------------------------------------------------------
region_letter() { [ "$1" = "$REGION_A" ] && echo a || echo b; }
pg_port() { [ "$1" = "$REGION_A" ] && echo "$PG_PORT_A" || echo "$PG_PORT_B"; }
kafka_port() { [ "$1" = "$REGION_A" ] && echo "$KAFKA_PORT_A" || echo "$KAFKA_PORT_B"; }
controller_port() { [ "$1" = "$REGION_A" ] && echo "$KAFKA_CONTROLLER_PORT_A" || echo "$KAFKA_CONTROLLER_PORT_B"; }
connect_port() { [ "$1" = "$REGION_A" ] && echo "$CONNECT_PORT_A" || echo "$CONNECT_PORT_B"; }
metrics_port() { [ "$1" = "$REGION_A" ] && echo "$WORKER_METRICS_PORT_A" || echo "$WORKER_METRICS_PORT_B"; }

# --- process helpers ----------------------------------------------------------
pid_of() { cat "$PIDS/$1.pid" 2>/dev/null || true; }
# A zombie (exited, not yet reaped by its parent) answers kill -0 but is
# gone: its state letter in /proc is Z.
alive() {
  local p state
  p=$(pid_of "$1")
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 1
  state=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1 || true)
  [ "$state" != Z ]
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Start a command detached from the caller (no inherited fds), record its pid.
spawn() {
  local name=$1; shift
  mkdir -p "$LOGS" "$PIDS"
  log "starting $name (log: $LOGS/$name.log)"
  setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
}

# wait_for NAME TIMEOUT_S CHECK...: poll CHECK until it passes; on failure or
# on the process dying, print the log's tail and fail.
wait_for() {
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ -f "$PIDS/$name.pid" ] && ! alive "$name"; then
      log "$name exited during start-up; last lines of $LOGS/$name.log:"
      tail -n 40 "$LOGS/$name.log" >&2 || true
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "$name not ready after ${timeout}s; last lines of $LOGS/$name.log:"
      tail -n 40 "$LOGS/$name.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
}

# Whether process $1 has exited (gone, or a zombie its parent has yet to reap).
exited() {
  local state
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true)
  [ -z "$state" ] || [ "$state" = Z ]
}

# reaped PID NAME TIMEOUT_S: wait until an exited process has left the process
# table. Its parent (runuser, for postgres) may itself be stopped, as a test's
# SIGSTOP of the child stops it too: continue it so that it reaps.
reaped() {
  local p=$1 name=$2 deadline=$((SECONDS + $3)) parent
  while [ -e "/proc/$p" ]; do
    parent=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ' || true)
    if [ -n "$parent" ] && [ "$parent" != 1 ]; then kill -CONT "$parent" 2>/dev/null || true; fi
    if [ $SECONDS -ge $deadline ]; then
      log "$name (pid $p) has exited but is not yet reaped by its parent ${parent:-?}"
      return 0
    fi
    sleep 0.2
  done
}

stop_pid() {
  local name=$1 timeout=${2:-30} p
  p=$(pid_of "$name")
  if [ -z "$p" ]; then return 0; fi
  if ! exited "$p"; then
    log "stopping $name (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    until exited "$p"; do
      if [ $SECONDS -ge $deadline ]; then
        log "$name did not stop in ${timeout}s; killing it"
        kill -KILL "$p" 2>/dev/null || true
        break
      fi
      sleep 0.5
    done
  fi
  reaped "$p" "$name" 10
  rm -f "$PIDS/$name.pid"
}

# Fill {{NAME}} placeholders from the environment.
render() {
  python3 - "$1" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
def sub(m):
    key = m.group(1)
    if key not in os.environ:
        sys.exit(f"{sys.argv[1]}: placeholder {{{{{key}}}}} has no value")
    return os.environ[key]
sys.stdout.write(re.sub(r"\{\{([A-Z0-9_]+)\}\}", sub, text))
PY
}

# --- install ------------------------------------------------------------------
install_debian() {
  local missing=()
  [ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15 postgresql-client-15)
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v kcat >/dev/null || missing+=(kcat)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  # tests/faults.rs cuts a PostgreSQL connection half-open with a DROP rule.
  command -v iptables >/dev/null || missing+=(iptables)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # The packages' own services must not start: this script runs its own.
    local policy=/usr/sbin/policy-rc.d created_policy=
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; created_policy=1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$created_policy" ]; then rm -f $policy; fi
  fi
}

install_jvm() {
  if [ -f "$DIST/.installed" ] && [ "$DIST/.installed" -nt "$HERE/pom.xml" ] &&
     [ "$DIST/.installed" -nt "$HERE/avro-converter/pom.xml" ]; then
    return 0
  fi
  log "resolving Kafka, Debezium and Apicurio with Maven (deploy/local/pom.xml)"
  rm -rf "$DIST"
  mkdir -p "$DIST/plugins"
  mvn -B -q -f "$HERE/pom.xml" -Dstack.dist="$DIST" \
    dependency:copy-dependencies dependency:copy@plugins
  mvn -B -q -f "$HERE/avro-converter/pom.xml" -Dstack.dist="$DIST" dependency:copy-dependencies
  tar -xzf "$DIST"/tarballs/debezium-connector-postgres-*-plugin.tar.gz -C "$DIST/plugins"
  mkdir -p "$DIST/registry"
  tar -xzf "$DIST"/tarballs/apicurio-registry-app-*-all.tar.gz -C "$DIST/registry"
  [ -n "$(registry_jar)" ] || die "the apicurio registry tarball has no runner jar"
  rm -rf "$DIST/tarballs"
  touch "$DIST/.installed"
}

# The Debezium JDBC sink (the benchmark's peer) in its own plugin folder,
# installed apart from install_jvm so that adding or changing it touches only
# that folder: Connect's plugin.path is the parent $DIST/plugins, so a running
# worker is left alone and loads the sink on its next start.
JDBC_SINK_DIR="$DIST/plugins/debezium-connector-jdbc"
install_jdbc_sink() {
  if [ -f "$JDBC_SINK_DIR/.installed" ] && [ "$JDBC_SINK_DIR/.installed" -nt "$HERE/jdbc-sink/pom.xml" ]; then
    return 0
  fi
  log "resolving the Debezium JDBC sink connector with Maven (deploy/local/jdbc-sink/pom.xml)"
  rm -rf "$JDBC_SINK_DIR" "$DIST/.jdbc-sink-markers"
  mkdir -p "$DIST/plugins"
  mvn -B -q -f "$HERE/jdbc-sink/pom.xml" -Dstack.dist="$DIST" dependency:unpack
  compgen -G "$JDBC_SINK_DIR/debezium-connector-jdbc-*.jar" >/dev/null ||
    die "the JDBC sink tarball did not unpack into $JDBC_SINK_DIR"
  touch "$JDBC_SINK_DIR/.installed"
}

cmd_install() {
  install_debian
  install_jvm
  install_jdbc_sink
}

# --- PostgreSQL ---------------------------------------------------------------
PG_BIN=/usr/lib/postgresql/15/bin
as_postgres() { runuser -u postgres -- "$@"; }
psql_admin() { # region, psql args...
  local region=$1; shift
  PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(pg_port "$region")" -U postgres "$@"
}

# postgres runs as its own user and must reach its data under target/stack/:
# give "others" traverse (not read) permission on any ancestor that lacks it,
# e.g. a checkout under /root.
ensure_traversable() {
  local d=$1
  while [ "$d" != / ]; do
    if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
      log "allowing the postgres user to traverse $d (chmod o+x)"
      chmod o+x "$d"
    fi
    d=$(dirname "$d")
  done
}

# --- The local CA and the certificates of the secured endpoints ----------------
TLS="$STATE/tls"

# Idempotent: made once, kept with the stack's data. The client certificate's
# common name is the role that logs in with it (pg_hba.conf `cert`).
tls_up() {
  [ -f "$TLS/client-regionsync_cert.pem" ] && return 0
  command -v openssl >/dev/null || die "openssl missing: run make stack-install"
  mkdir -p "$TLS"
  log "making the local CA and certificates in $TLS"
  (
    cd "$TLS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=regionsync local CA" \
      -keyout ca-key.pem -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout server-key.pem -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=regionsync_cert" \
      -keyout client-regionsync_cert-key.pem -out client.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
      -extfile client.ext -out client-regionsync_cert.pem.tmp 2>/dev/null
    # Kafka reads an unencrypted PKCS#8 key and its certificate from one file.
    cat server-key.pem server.pem >kafka-keystore.pem
    rm -f ./*.csr ./*.ext
    mv client-regionsync_cert.pem.tmp client-regionsync_cert.pem
  )
  chmod 644 "$TLS"/*.pem
  chmod 600 "$TLS"/*-key.pem "$TLS/kafka-keystore.pem"
}

# PostgreSQL B serves TLS with the local CA's server certificate; the role
# regionsync_cert must present a client certificate (hostssl … cert). Applied
# on every `up`: prints "changed" when it changed the server's files.
pg_tls_conf() {
  local region=$1 data=$2
  [ "$region" = "$REGION_B" ] || return 0
  local changed=
  if [ ! -f "$data/server.crt" ] || ! cmp -s "$TLS/server.pem" "$data/server.crt"; then
    install -o postgres -g postgres -m 644 "$TLS/server.pem" "$data/server.crt"
    install -o postgres -g postgres -m 600 "$TLS/server-key.pem" "$data/server.key"
    install -o postgres -g postgres -m 644 "$TLS/ca.pem" "$data/root.crt"
    changed=1
  fi
  if ! grep -q '^ssl = on' "$data/postgresql.conf"; then
    cat >>"$data/postgresql.conf" <<EOF
# TLS with the local CA's certificate (target/stack/tls/).
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'root.crt'
EOF
    changed=1
  fi
  if ! grep -q 'regionsync_cert' "$data/pg_hba.conf"; then
    { echo "hostssl all regionsync_cert 127.0.0.1/32 cert"; cat "$data/pg_hba.conf"; } >"$data/pg_hba.conf.new"
    mv "$data/pg_hba.conf.new" "$data/pg_hba.conf"
    chown postgres:postgres "$data/pg_hba.conf"
    changed=1
  fi
  [ -z "$changed" ] || echo changed
}

pg_up() {
  local region=$1 name data port
  name="postgres-$region"; data="$STATE/$name"; port=$(pg_port "$region")
  if alive "$name" && as_postgres "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    if [ -n "$(pg_tls_conf "$region" "$data")" ]; then
      log "reloading $name for TLS"
      as_postgres "$PG_BIN/pg_ctl" -D "$data" reload >/dev/null
    fi
    pg_schemas "$region"
    return 0
  fi
  mkdir -p "$LOGS" "$PIDS"
  local fresh=
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initdb $region in $data"
    mkdir -p "$data"; chown postgres:postgres "$data"; chmod 700 "$data"
    ensure_traversable "$STATE"
    as_postgres "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >>"$LOGS/$name.log" 2>&1
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$data'
wal_level = logical
max_wal_senders = 10
# The connectors' slots, and one origin state per regionsync apply session
# origin (regionsync_0..63, see src/apply/session.rs).
max_replication_slots = 80
max_connections = 100
shared_buffers = 256MB
wal_writer_delay = 10ms
logging_collector = off
log_min_messages = warning
EOF
    # The stack's superuser connects over loopback without a password; every
    # other role (app, debezium, regionsync) uses its password.
    cat >"$data/pg_hba.conf" <<EOF
local all         all                    trust
host  all         postgres 127.0.0.1/32  trust
host  all         all      127.0.0.1/32  scram-sha-256
host  replication all      127.0.0.1/32  scram-sha-256
EOF
    fresh=1
  fi
  # The peers benchmark (make bench-peers) reads each row's commit time in both
  # regions with pg_xact_commit_timestamp; appended here so that a data
  # directory made before it was needed gets it on its next start too.
  grep -q '^track_commit_timestamp' "$data/postgresql.conf" ||
    echo "track_commit_timestamp = on" >>"$data/postgresql.conf"
  pg_tls_conf "$region" "$data" >/dev/null
  chown -R postgres:postgres "$data"
  touch "$LOGS/$name.log"; chown postgres "$LOGS/$name.log"
  log "starting $name (log: $LOGS/$name.log)"
  # postgres itself stays in the foreground of its own session: its pid is ours.
  setsid runuser -u postgres -- "$PG_BIN/postgres" -D "$data" </dev/null >>"$LOGS/$name.log" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  wait_for "$name" 60 as_postgres "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port"
  # runuser forks: record the postmaster's own pid for stop.
  head -n 1 "$data/postmaster.pid" >"$PIDS/$name.pid"
  if [ -n "$fresh" ] || ! psql_admin "$region" -d app -c 'select 1' >/dev/null 2>&1; then
    psql_admin "$region" -d postgres -c "CREATE DATABASE app" >/dev/null 2>&1 || true
  fi
  pg_schemas "$region"
}

# Schemas and grants are idempotent: applied on every `up`.
pg_schemas() {
  local region=$1
  psql_admin "$region" -d app -c "ALTER DATABASE app SET regionsync.region = '$region'"
  PGOPTIONS="-c regionsync.region=$region" psql_admin "$region" -d app \
    -f "$ROOT/schemas/regionsync.sql" -f "$ROOT/schemas/app.sql" >/dev/null
  psql_admin "$region" -d app -v region="$region" -v app_password="$APP_PASSWORD" \
    -v debezium_password="$DEBEZIUM_PASSWORD" -v regionsync_password="$REGIONSYNC_PASSWORD" \
    -f "$HERE/bootstrap.sql" >/dev/null
  # The client-certificate role (pg_hba.conf: hostssl … cert) may do what
  # regionsync does, and has no password.
  psql_admin "$region" -d app >/dev/null <<'EOF'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'regionsync_cert') THEN
    CREATE ROLE regionsync_cert LOGIN IN ROLE regionsync;
  END IF;
END $$;
EOF
}

pg_down() {
  local region=$1 name="postgres-$1" p
  p=$(pid_of "$name")
  [ -n "$p" ] || return 0
  if kill -0 "$p" 2>/dev/null; then
    log "stopping $name (pid $p)"
    # Its runuser parent stops itself when the postmaster is stopped (a
    # test's SIGSTOP) and, if its SIGCONT came first, stays stopped: it
    # would never reap the postmaster, left a zombie after pg_ctl stop.
    local parent
    parent=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ' || true)
    if [ -n "$parent" ] && [ "$parent" != 1 ]; then kill -CONT "$parent" 2>/dev/null || true; fi
    as_postgres "$PG_BIN/pg_ctl" -D "$STATE/$name" -m fast -w -t 60 stop >/dev/null 2>&1 ||
      stop_pid "$name" 30
    # pg_ctl returns when the postmaster has removed its pid file, a moment
    # before it exits: down means the process is gone.
    local deadline=$((SECONDS + 30))
    until exited "$p" || [ $SECONDS -ge $deadline ]; do sleep 0.2; done
    exited "$p" || stop_pid "$name" 5
    reaped "$p" "$name" 10
  fi
  rm -f "$PIDS/$name.pid"
}

# --- Kafka (KRaft, one combined broker+controller per region) -------------------
kafka_ready() { kcat -b "127.0.0.1:$1" -L -m 3 -J >/dev/null 2>&1; }

# The listener lines of a broker: the plain one and the controller's, and on
# Kafka B a second listener, SASL_SSL with SCRAM-SHA-512.
kafka_listeners() { # region port controller-port
  if [ "$1" = "$REGION_B" ]; then
    cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$2,CONTROLLER://127.0.0.1:$3,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT_B
advertised.listeners=PLAINTEXT://127.0.0.1:$2,SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT_B
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location=$TLS/kafka-keystore.pem
EOF
  else
    cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$2,CONTROLLER://127.0.0.1:$3
advertised.listeners=PLAINTEXT://127.0.0.1:$2
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
EOF
  fi
}

# Kafka B's SCRAM user regionsync, with REGIONSYNC_PASSWORD (idempotent).
kafka_scram_user() { # port
  java -cp "$DIST/lib/*" "${JAVA_SMALL[@]}" kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$1" \
    --alter --entity-type users --entity-name regionsync \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$REGIONSYNC_PASSWORD]" >>"$LOGS/kafka-$REGION_B.log" 2>&1 ||
    die "adding Kafka B's SCRAM user failed (log: $LOGS/kafka-$REGION_B.log)"
}

kafka_up() {
  local region=$1 name dir port cport
  name="kafka-$region"; dir="$STATE/$name"; port=$(kafka_port "$region"); cport=$(controller_port "$region")
  if alive "$name" && kafka_ready "$port"; then
    # A broker started with other listeners (before the SASL_SSL one existed,
    # or with other ports) is restarted with the current ones.
    if kafka_listeners "$region" "$port" "$cport" | grep -qxvFf "$dir/server.properties"; then
      log "restarting $name: its listeners changed"
      stop_pid "$name" 60
    else
      return 0
    fi
  fi
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
$(kafka_listeners "$region" "$port" "$cport")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.cleaner.dedupe.buffer.size=8388608
log.retention.hours=-1
# After a SIGKILL (make test's whole-region failure) the broker checks
# every partition's log before it serves: hundreds of test topics, one
# thread each by default.
num.recovery.threads.per.data.dir=4
EOF
  if [ ! -f "$dir/data/meta.properties" ]; then
    local cluster_id
    # A cluster id is a url-safe base64 UUID; one that starts with '-' would be
    # read as an option by kafka-storage (1 in 64 draws), so draw again, as
    # Kafka's own random-uuid does.
    cluster_id=$(python3 -c '
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break')
    log "formatting $name storage (cluster id $cluster_id)"
    java -cp "$DIST/lib/*" "${JAVA_SMALL[@]}" kafka.tools.StorageTool format --standalone \
      -t "$cluster_id" -c "$dir/server.properties" >>"$LOGS/$name.log" 2>&1 ||
      { tail -n 20 "$LOGS/$name.log" >&2; die "formatting $name failed"; }
  fi
  spawn "$name" java -Xmx384m "${JAVA_SMALL[@]}" -cp "$DIST/lib/*" kafka.Kafka "$dir/server.properties"
  if [ "$region" = "$REGION_B" ]; then
    wait_for "$name" 120 kafka_ready "$port"
    kafka_scram_user "$port"
  fi
}

# --- Apicurio Registry (one, shared by both regions) ----------------------------
registry_jar() { find "$DIST/registry" -maxdepth 1 -name 'apicurio-registry-app-*-runner.jar' -print -quit; }
registry_ready() { curl -fsS "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null; }

registry_up() {
  local name=registry
  if alive "$name" && registry_ready; then return 0; fi
  mkdir -p "$STATE/registry"
  # The registry keeps its schemas in H2, in memory by default: pointed at a
  # file under target/stack/ instead, schema ids survive a stack restart (the
  # Avro events already in Kafka carry them).
  REGISTRY_DATASOURCE_URL="jdbc:h2:file:$STATE/registry/db;DB_CLOSE_ON_EXIT=FALSE" \
    spawn "$name" java -Xmx320m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -jar "$(registry_jar)"
}

# --- Kafka Connect with Debezium -------------------------------------------------
connect_ready() { curl -fsS "http://127.0.0.1:$1/connectors" >/dev/null; }

connect_up() {
  local region=$1 name dir port kport
  name="connect-$region"; dir="$STATE/$name"; port=$(connect_port "$region"); kport=$(kafka_port "$region")
  if alive "$name" && connect_ready "$port"; then return 0; fi
  mkdir -p "$dir"
  cat >"$dir/connect.properties" <<EOF
bootstrap.servers=127.0.0.1:$kport
group.id=connect-$region
listeners=http://127.0.0.1:$port
rest.advertised.host.name=127.0.0.1
plugin.path=$DIST/plugins
plugin.discovery=hybrid_warn
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
offset.storage.topic=connect-offsets
config.storage.topic=connect-configs
status.storage.topic=connect-status
offset.storage.replication.factor=1
config.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=5
status.storage.partitions=1
offset.flush.interval.ms=1000
topic.creation.enable=true
# Debezium's JSON change events carry their schema (about 6 KB each): the
# producer's default 16 KiB batches held two. Larger lz4 batches cost
# Connect and Kafka less per event (make bench-peers, live phase).
producer.batch.size=524288
producer.linger.ms=10
producer.compression.type=lz4
config.providers=env
config.providers.env.class=org.apache.kafka.common.config.provider.EnvVarConfigProvider
EOF
  # The sink password is for the benchmark's peer, the Debezium JDBC sink
  # (tools/peer/debezium-jdbc-sink.json), registered only by make bench-peers.
  REGIONSYNC_DEBEZIUM_PASSWORD="$DEBEZIUM_PASSWORD" REGIONSYNC_SINK_PASSWORD="$REGIONSYNC_PASSWORD" \
    spawn "$name" java "${JAVA_CONNECT[@]}" -cp "$DIST/lib/*" \
    org.apache.kafka.connect.cli.ConnectDistributed "$dir/connect.properties"
}

# PUT is idempotent: registering again updates the config in place.
register_connector() {
  local region=$1 variant=$2 port body
  port=$(connect_port "$region")
  body=$(REGION="$region" PG_HOST=127.0.0.1 PG_PORT="$(pg_port "$region")" PG_DATABASE=app \
    DEBEZIUM_USER=debezium TOPIC_PARTITIONS="$TOPIC_PARTITIONS" REPLICATION_FACTOR=1 \
    REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT/apis/registry/v2" \
    render "$ROOT/connectors/debezium-postgres-$variant.json")
  curl -fsS -X PUT -H 'Content-Type: application/json' --data "$body" \
    "http://127.0.0.1:$port/connectors/cdc-$variant/config" >/dev/null ||
    die "registering connector cdc-$variant on $region failed"
}

connector_running() { # port name
  curl -fsS "http://127.0.0.1:$1/connectors/$2/status" |
    python3 -c 'import json,sys; s=json.load(sys.stdin); ok=s["connector"]["state"]=="RUNNING" and s["tasks"] and all(t["state"]=="RUNNING" for t in s["tasks"]); sys.exit(0 if ok else 1)'
}

connector_failure() {
  curl -fsS "http://127.0.0.1:$1/connectors/$2/status" |
    python3 -c 'import json,sys; s=json.load(sys.stdin); [print(t.get("trace","")[:3000]) for t in s["tasks"] if t["state"]=="FAILED"]' || true
}

connectors_up() {
  local region=$1 port variant deadline
  port=$(connect_port "$region")
  for variant in json avro; do
    register_connector "$region" "$variant"
  done
  deadline=$((SECONDS + 120))
  for variant in json avro; do
    until connector_running "$port" "cdc-$variant" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        connector_failure "$port" "cdc-$variant" >&2
        die "connector cdc-$variant on $region is not RUNNING (log: $LOGS/connect-$region.log)"
      fi
      # A task that failed (e.g. the database was not ready) gets one restart.
      curl -fsS -X POST "http://127.0.0.1:$port/connectors/cdc-$variant/restart?includeTasks=true&onlyFailed=true" >/dev/null 2>&1 || true
      sleep 2
    done
  done
}

# --- MirrorMaker 2 -------------------------------------------------------------
mm2_ready() {
  # Ready once its connectors run: the flows' offset-sync and heartbeat topics exist.
  kcat -b "127.0.0.1:$KAFKA_PORT_B" -L -J 2>/dev/null | grep -q "\"$REGION_A.heartbeats\"\|\"heartbeats\"" &&
    kcat -b "127.0.0.1:$KAFKA_PORT_A" -L -J 2>/dev/null | grep -q "\"$REGION_B.heartbeats\"\|\"heartbeats\"" &&
    mm2_started_since_spawn
}

# The log is appended to across restarts: only a "started" line after the
# newest spawn marker counts.
mm2_started_since_spawn() {
  awk '/^\[stack\] spawned mirrormaker2/ { ok = 0 } /Kafka MirrorMaker started/ { ok = 1 } END { exit !ok }' \
    "$LOGS/mirrormaker2.log"
}

mm2_up() {
  local name=mirrormaker2
  if alive "$name" && mm2_ready; then return 0; fi
  mkdir -p "$STATE/$name"
  REGION_A="$REGION_A" REGION_B="$REGION_B" KAFKA_A="127.0.0.1:$KAFKA_PORT_A" \
    KAFKA_B="127.0.0.1:$KAFKA_PORT_B" REPLICATION_FACTOR=1 \
    render "$ROOT/connectors/mirrormaker2.properties" >"$STATE/$name/mm2.properties"
  mkdir -p "$LOGS"
  echo "[stack] spawned mirrormaker2 $(date -u +%FT%TZ)" >>"$LOGS/$name.log"
  spawn "$name" java -Xmx384m "${JAVA_SMALL[@]}" -cp "$DIST/lib/*" \
    org.apache.kafka.connect.mirror.MirrorMaker "$STATE/$name/mm2.properties"
}

# --- Prometheus ----------------------------------------------------------------
prometheus_ready() { curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null; }

prometheus_up() {
  local name=prometheus
  if alive "$name" && prometheus_ready; then
    # Pick up edited rules (deploy/prometheus/) without a restart.
    curl -fsS -X POST "http://127.0.0.1:$PROMETHEUS_PORT/-/reload" >/dev/null ||
      die "Prometheus refused to reload its rules (log: $LOGS/$name.log)"
    return 0
  fi
  mkdir -p "$STATE/$name/data"
  REGION_A="$REGION_A" REGION_B="$REGION_B" METRICS_A="127.0.0.1:$WORKER_METRICS_PORT_A" \
    METRICS_B="127.0.0.1:$WORKER_METRICS_PORT_B" RULES_DIR="$ROOT/deploy/prometheus" \
    render "$HERE/prometheus.yml" >"$STATE/$name/prometheus.yml"
  spawn "$name" prometheus --config.file="$STATE/$name/prometheus.yml" \
    --storage.tsdb.path="$STATE/$name/data" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle
}

# --- regionsync workers (not part of `up`) ----------------------------------------
WORKER_BIN="$ROOT/target/release/regionsync"
worker_config() { echo "$HERE/regionsync-$1.toml"; }
worker_ready() { curl -fsS "http://127.0.0.1:$1/metrics" >/dev/null; }

cmd_workers_up() {
  local region name port
  for region in "${REGIONS[@]}"; do
    [ -f "$(worker_config "$region")" ] || die "no worker config $(worker_config "$region")"
  done
  command -v cargo >/dev/null || die "cargo is not installed"
  log "building regionsync (cargo build --release --bin regionsync)"
  (cd "$ROOT" && cargo build --release --bin regionsync) || die "building regionsync failed"
  for region in "${REGIONS[@]}"; do
    name="regionsync-$region"; port=$(metrics_port "$region")
    if alive "$name"; then
      log "$name is already running (pid $(pid_of "$name"))"
      continue
    fi
    port_open "$port" && die "127.0.0.1:$port (metrics of $name) is taken by another process"
    # The password comes from the environment, never from the config file;
    # the addresses follow env.sh, so overriding a port there is enough.
    REGIONSYNC_POSTGRES__PASSWORD="$REGIONSYNC_PASSWORD" \
      REGIONSYNC_POSTGRES__PORT="$(pg_port "$region")" \
      REGIONSYNC_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:$(kafka_port "$region")" \
      REGIONSYNC_SCHEMA_REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7" \
      REGIONSYNC_METRICS__LISTEN="127.0.0.1:$port" \
      RUST_LOG="${RUST_LOG:-info,rdkafka=warn}" NO_COLOR=1 \
      spawn "$name" "$WORKER_BIN" --config "$(worker_config "$region")" run
  done
  for region in "${REGIONS[@]}"; do
    wait_for "regionsync-$region" 60 worker_ready "$(metrics_port "$region")"
  done
  # /metrics answers before the worker has connected to Kafka and PostgreSQL:
  # give a bad connection a moment to show up as an exit.
  sleep 2
  for region in "${REGIONS[@]}"; do
    name="regionsync-$region"
    if ! alive "$name"; then
      log "$name exited during start-up; last lines of $LOGS/$name.log:"
      tail -n 40 "$LOGS/$name.log" >&2 || true
      exit 1
    fi
    log "$name is up (pid $(pid_of "$name")): http://127.0.0.1:$(metrics_port "$region")/metrics"
  done
}

cmd_workers_down() {
  local region
  for region in "${REGIONS[@]}"; do stop_pid "regionsync-$region" 15; done
}

# --- a whole-region failure and the region's return -------------------------------
known_region() {
  [ "${1:-}" = "$REGION_A" ] || [ "${1:-}" = "$REGION_B" ] ||
    die "unknown region '${1:-}': $REGION_A or $REGION_B"
}

cmd_region_kill() {
  local region=$1 name p pids=()
  known_region "$region"
  p=$(pid_of "postgres-$region")
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    # The postmaster and its backends together, as a crash of the machine
    # would: a backend left behind would keep the shared memory and stop
    # the next start.
    # shellcheck disable=SC2207
    pids+=("$p" $(pgrep -P "$p" || true))
  fi
  for name in "kafka-$region" "connect-$region" mirrormaker2; do
    p=$(pid_of "$name")
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then pids+=("$p"); fi
  done
  [ ${#pids[@]} -gt 0 ] || { log "nothing of $region is running"; return 0; }
  log "killing $region (SIGKILL): ${pids[*]}"
  kill -KILL "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | cut -c1)" != Z ]; do
      [ $SECONDS -lt $deadline ] || die "pid $p survived SIGKILL for 30 s"
      sleep 0.2
    done
  done
}

cmd_region_up() {
  local region=$1
  known_region "$region"
  check_ports
  mkdir -p "$LOGS" "$PIDS"
  local t0=$SECONDS limit=600
  # After a SIGKILL Kafka recovers every partition's log first, and on a
  # busy machine each JVM takes minutes to start (Kafka once took over
  # 300 s): hence the longer limits than `up`'s, and Connect and
  # MirrorMaker 2 (which needs only the two brokers) started together. A
  # service still starting from an earlier region-up that gave up is
  # waited for, not started a second time on the same data and port.
  if alive "postgres-$region"; then wait_for "postgres-$region" $limit pg_ready "$(pg_port "$region")"; fi
  pg_up "$region"
  if ! alive "kafka-$region"; then kafka_up "$region"; fi
  wait_for "kafka-$region" $limit kafka_ready "$(kafka_port "$region")"
  if ! alive "connect-$region"; then connect_up "$region"; fi
  if ! alive mirrormaker2; then mm2_up; fi
  wait_for "connect-$region" $limit connect_ready "$(connect_port "$region")"
  connectors_up "$region"
  wait_for mirrormaker2 $limit mm2_ready
  log "$region is up ($((SECONDS - t0))s)"
}

# --- commands --------------------------------------------------------------------
# Every port of env.sh must be its own: two services on one port would fail
# late and obscurely (the controllers once took KAFKA_PORT+1, which is now
# Kafka B's SASL_SSL listener).
check_ports() {
  local v seen=" "
  for v in PG_PORT_A PG_PORT_B KAFKA_PORT_A KAFKA_PORT_B KAFKA_CONTROLLER_PORT_A KAFKA_CONTROLLER_PORT_B \
    KAFKA_SASL_PORT_B CONNECT_PORT_A CONNECT_PORT_B REGISTRY_PORT PROMETHEUS_PORT \
    WORKER_METRICS_PORT_A WORKER_METRICS_PORT_B; do
    case "$seen" in *" ${!v} "*) die "port ${!v} of $v is also another service's (deploy/local/env.sh)" ;; esac
    seen="$seen${!v} "
  done
}

cmd_up() {
  local t0=$SECONDS region
  check_ports
  cmd_install
  mkdir -p "$LOGS" "$PIDS"
  tls_up
  for region in "${REGIONS[@]}"; do pg_up "$region"; done
  # Both brokers start together; each is small and mostly waits on I/O.
  for region in "${REGIONS[@]}"; do kafka_up "$region"; done
  for region in "${REGIONS[@]}"; do
    wait_for "kafka-$region" 120 kafka_ready "$(kafka_port "$region")"
  done
  registry_up
  wait_for registry 120 registry_ready
  for region in "${REGIONS[@]}"; do connect_up "$region"; done
  for region in "${REGIONS[@]}"; do
    wait_for "connect-$region" 180 connect_ready "$(connect_port "$region")"
  done
  for region in "${REGIONS[@]}"; do connectors_up "$region"; done
  mm2_up
  wait_for mirrormaker2 180 mm2_ready
  prometheus_up
  wait_for prometheus 60 prometheus_ready
  log "stack is up ($((SECONDS - t0))s)"
  cmd_status
}

cmd_down() {
  cmd_workers_down
  stop_pid prometheus 20
  stop_pid mirrormaker2 30
  local region
  for region in "${REGIONS[@]}"; do stop_pid "connect-$region" 30; done
  stop_pid registry 20
  for region in "${REGIONS[@]}"; do stop_pid "kafka-$region" 60; done
  for region in "${REGIONS[@]}"; do pg_down "$region"; done
  log "stack is down"
}

status_line() { # name port check...
  local name=$1 port=$2; shift 2
  local state=down p
  p=$(pid_of "$name")
  if alive "$name"; then
    if "$@" >/dev/null 2>&1; then state=up; else state=starting; fi
  else
    p=-
  fi
  printf '%-24s %-9s %-17s %-8s %s\n' "$name" "$state" "127.0.0.1:$port" "${p:--}" "$LOGS/$name.log"
}

pg_ready() { as_postgres "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$1"; }

cmd_status() {
  printf '%-24s %-9s %-17s %-8s %s\n' SERVICE STATE ADDRESS PID LOG
  local region
  for region in "${REGIONS[@]}"; do status_line "postgres-$region" "$(pg_port "$region")" pg_ready "$(pg_port "$region")"; done
  for region in "${REGIONS[@]}"; do status_line "kafka-$region" "$(kafka_port "$region")" kafka_ready "$(kafka_port "$region")"; done
  status_line "kafka-$REGION_B" "$KAFKA_SASL_PORT_B" port_open "$KAFKA_SASL_PORT_B" # SASL_SSL
  status_line registry "$REGISTRY_PORT" registry_ready
  for region in "${REGIONS[@]}"; do status_line "connect-$region" "$(connect_port "$region")" connect_ready "$(connect_port "$region")"; done
  status_line mirrormaker2 - mm2_ready
  status_line prometheus "$PROMETHEUS_PORT" prometheus_ready
  for region in "${REGIONS[@]}"; do
    status_line "regionsync-$region" "$(metrics_port "$region")" worker_ready "$(metrics_port "$region")"
  done
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  workers-up) cmd_workers_up ;;
  workers-down) cmd_workers_down ;;
  region-kill) cmd_region_kill "${2:-}" ;;
  region-up) cmd_region_up "${2:-}" ;;
  *) echo "usage: $0 install|up|down|status|workers-up|workers-down|region-kill REGION|region-up REGION" >&2; exit 2 ;;
esac
