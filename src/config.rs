//! Config: the worker's configuration, one TOML file with every key
//! overridable from the environment (`REGIONSYNC_` + the key path joined by
//! `__`, e.g. `REGIONSYNC_POSTGRES__HOST`). [`Config::validate`] names every
//! bad field at once, before anything connects or consumes. Secrets (the
//! database password, the SASL password, the registry's password or token)
//! come from the environment or from a file (`*_file`, as Kubernetes mounts
//! Secrets), and cannot be printed: [`Secret`] redacts itself in `Debug`
//! and is never serialized, and [`KafkaConfig`]'s `Debug` hides the values
//! of pass-through properties that hold secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// Batch bounds: against 5,000 rows / 8 MiB, 2,000 / 4 MiB replayed 1M
/// changes as fast or faster and kept peak RSS near 100–120 MB instead of
/// 120–190 MB (`make bench`, both encodings). Small Avro messages reached
/// 2,000-row batches and then 141–161 MB; 1,000 rows kept them at 120 MB
/// within the run-to-run noise of the rate (JSON's 4 MiB batches hold ~530).
pub const DEFAULT_BATCH_MAX_ROWS: usize = 1_000;
pub const DEFAULT_BATCH_MAX_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_LINGER_MS: u64 = 20;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_POOL_SIZE: usize = 2;
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_HEARTBEAT_TOPIC: &str = "cdc.regionsync.heartbeat";
/// How far in the future a change's HLC may be before its writer's clock
/// counts as wrong (DESIGN.md §4).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// What a worker does with a remote region's write to a row homed in its own
/// region (DESIGN.md §3).
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The newer `(hlc, origin_region)` wins; a concurrent loser is recorded
    /// in `regionsync.conflicts` (the default).
    #[default]
    Lww,
    /// The home region's row stays: the remote write is recorded and not
    /// applied, and the home region writes its row again with a newer
    /// version, so every region ends with the home version.
    Reject,
    /// The home region's row stays and both versions are recorded until an
    /// operator runs `regionsync conflicts resolve`.
    Manual,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Lww => "lww",
            Policy::Reject => "reject",
            Policy::Manual => "manual",
        }
    }
}

/// How long a delete's tombstone is kept (DESIGN.md §4): longer than any
/// replication lag, so no older change of the key can still arrive.
pub const DEFAULT_TOMBSTONE_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What to do with a change older than `tombstone_grace` for a key with no
/// row here: its key's tombstone may have been collected, so applying it
/// could bring back a deleted row.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LateChanges {
    /// Count it (`outcome="late"`), log it, do not apply it (the default).
    #[default]
    Skip,
    /// Apply it: for replaying topics into an empty replica (a rebuild),
    /// where every change is old and nothing can be resurrected.
    Apply,
}

/// What to do with a change or truncate dated further in the future than
/// `max_clock_skew` (its HLC or its source commit time `ts_ms`).
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClockAhead {
    /// Hold its partition at it until the local clock is within
    /// `max_clock_skew` of it (the default): a truncate from a clock far
    /// ahead would delete newer rows and refuse every later write.
    #[default]
    Hold,
    /// Send it to the dead-letter topic (reason `clock_ahead`).
    Dlq,
    /// Apply it all the same, counted and logged: the version order stays
    /// total, but its writer wins every conflict until the clocks meet.
    Apply,
}

/// What to do with a message that cannot be decoded or applied.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Send it to the dead-letter topic and move on (the default).
    #[default]
    Dlq,
    /// Stop the worker with an error; the offset stays before the message.
    Stop,
}

/// What to do with a change that meets a schema difference between its
/// source and the target (docs/SCHEMA-CHANGES.md): a column the target
/// does not have yet, a value the target's narrower type cannot hold, a
/// NOT NULL the source did not have.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnSchemaMismatch {
    /// Hold the partition at the change and retry, reading the table's
    /// layout again each time, until the migration reaches this region
    /// (the default).
    #[default]
    Hold,
    /// Send the change to the dead-letter topic (reason `schema_mismatch`).
    Dlq,
    /// Stop the worker; the offset stays before the change.
    Stop,
}

impl OnSchemaMismatch {
    pub fn as_str(self) -> &'static str {
        match self {
            OnSchemaMismatch::Hold => "hold",
            OnSchemaMismatch::Dlq => "dlq",
            OnSchemaMismatch::Stop => "stop",
        }
    }
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This worker's region: the one whose database it writes.
    pub region: String,
    /// Every region, in routing order (DESIGN.md §3).
    pub regions: Vec<String>,
    /// The regions whose mirrored topics this worker consumes (default: every
    /// region but this one).
    #[serde(default)]
    pub source_regions: Vec<String>,
    /// Kafka consumer group; default `regionsync-<region>`.
    #[serde(default)]
    pub consumer_group: Option<String>,
    #[serde(default)]
    pub on_error: OnError,
    /// A change that meets a schema difference (docs/SCHEMA-CHANGES.md);
    /// `tables[].on_schema_mismatch` overrides it per table.
    #[serde(default)]
    pub on_schema_mismatch: OnSchemaMismatch,
    /// Dead-letter topic on the local Kafka; default `regionsync.dlq.<region>`.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub schema_registry: SchemaRegistryConfig,
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub apply: ApplyConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The source topic (without the region prefix MirrorMaker 2 adds) whose
    /// events carry the source regions' heartbeats.
    #[serde(default = "default_heartbeat_topic")]
    pub heartbeat_topic: String,
    /// The largest lead of a change's HLC physical part over this worker's
    /// clock that is still believed, as a duration like "500ms" or "5s"
    /// (see [`crate::clock::exceeds_clock_skew`]).
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// A change or truncate beyond `max_clock_skew`: hold, dlq or apply.
    #[serde(default)]
    pub clock_ahead: ClockAhead,
    /// How long tombstones are kept before the worker collects them, e.g.
    /// "7d"; must exceed the longest replication lag.
    #[serde(default = "default_tombstone_grace", with = "humantime_serde")]
    pub tombstone_grace: Duration,
    /// Changes older than `tombstone_grace` for keys with no row here.
    #[serde(default)]
    pub late_changes: LateChanges,
    /// The conflicts recorded in `regionsync.conflicts`.
    #[serde(default)]
    pub conflicts: ConflictsConfig,
    /// The replicated tables; only these are ever written.
    pub tables: Vec<TableConfig>,
}

/// How long a resolved conflict is kept in `regionsync.conflicts`.
pub const DEFAULT_CONFLICTS_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The recorded conflicts (`regionsync.conflicts`, DESIGN.md §4).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsConfig {
    /// A resolved conflict (settled by its policy or by an operator) is
    /// deleted this long after its resolution, e.g. "30d". Unresolved ones
    /// are kept until resolved, and counted.
    #[serde(default = "default_conflicts_retention", with = "humantime_serde")]
    pub retention: Duration,
}

fn default_conflicts_retention() -> Duration {
    DEFAULT_CONFLICTS_RETENTION
}

impl Default for ConflictsConfig {
    fn default() -> Self {
        ConflictsConfig {
            retention: DEFAULT_CONFLICTS_RETENTION,
        }
    }
}

fn default_tombstone_grace() -> Duration {
    DEFAULT_TOMBSTONE_GRACE
}

fn default_heartbeat_topic() -> String {
    DEFAULT_HEARTBEAT_TOPIC.to_string()
}

fn default_max_clock_skew() -> Duration {
    DEFAULT_MAX_CLOCK_SKEW
}

#[derive(Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// librdkafka's `security.protocol`; default plaintext.
    #[serde(default)]
    pub security_protocol: Option<SecurityProtocol>,
    /// librdkafka's `sasl.mechanism`; needs a SASL `security_protocol`.
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// The SASL password; prefer `sasl_password_file` or the environment
    /// (`REGIONSYNC_KAFKA__SASL_PASSWORD`).
    #[serde(default, skip_serializing)]
    pub sasl_password: Option<Secret>,
    /// A file whose content (without a trailing newline) is the SASL password.
    #[serde(default)]
    pub sasl_password_file: Option<String>,
    /// PEM file of the CA(s) that signed the brokers' certificates
    /// (librdkafka's `ssl.ca.location`); default: librdkafka's own.
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    /// Any librdkafka property, passed through as is (tuning, client
    /// certificates, OAUTHBEARER…); it wins over the typed keys above.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Start a partition that has no stored offset even when retention
    /// has deleted the beginning of its topic (the changes there are then
    /// missing here); by default such a partition is stopped.
    #[serde(default)]
    pub accept_missing_history: bool,
}

/// Whether a pass-through librdkafka property holds a secret (its value is
/// then never printed).
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("properties", &properties)
            .field("accept_missing_history", &self.accept_missing_history)
            .finish()
    }
}

/// librdkafka's `security.protocol`.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn is_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
    pub fn is_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// librdkafka's `sasl.mechanism`, those that take a user name and password
/// (OAUTHBEARER and GSSAPI go through `kafka.properties`).
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "PLAIN")]
    Plain,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::Plain => "PLAIN",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// The Confluent-compatible API of the registry every source region uses.
    #[serde(default)]
    pub url: Option<String>,
    /// Per source region, where regions use different registries (schema ids
    /// belong to the registry that issued them).
    #[serde(default)]
    pub per_region: BTreeMap<String, String>,
    /// What a change whose schema id the registry does not know becomes:
    /// held and retried (the registry may be behind, or restored from a
    /// backup), or dead-lettered.
    #[serde(default)]
    pub unknown_schema: UnknownSchema,
    /// Basic authentication: the user (Confluent Cloud: the API key).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic authentication: the password (Confluent Cloud: the API secret).
    #[serde(default, skip_serializing)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<String>,
    /// A bearer token instead of a user and password.
    #[serde(default, skip_serializing)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<String>,
    /// PEM file of the CA(s) that signed the registry's certificate, trusted
    /// beside the system's roots.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// See [`SchemaRegistryConfig::unknown_schema`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSchema {
    #[default]
    Retry,
    Dlq,
}

/// libpq's `sslmode`: whether to use TLS and what to check.
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain connections only.
    Disable,
    /// TLS if the server offers it, else plain; the certificate is not
    /// checked (the default, as libpq's).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked, unless `sslrootcert`
    /// is set, when it is checked as with `verify-ca` (as libpq does).
    Require,
    /// TLS, the server's certificate signed by a CA of `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub host: String,
    /// The IP address to connect to, as libpq's `hostaddr`: `host` is then
    /// only the name the server's certificate must carry (`verify-full`).
    #[serde(default)]
    pub hostaddr: Option<String>,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// The password itself; prefer `password_file` or the environment
    /// (`REGIONSYNC_POSTGRES__PASSWORD`).
    #[serde(default, skip_serializing)]
    pub password: Option<Secret>,
    /// A file whose content (trimmed) is the password.
    #[serde(default)]
    pub password_file: Option<String>,
    /// TLS, as libpq's `sslmode` (default `prefer`).
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file of the CA(s) trusted to sign the server's certificate.
    #[serde(default)]
    pub sslrootcert: Option<String>,
    /// PEM file of the client certificate (for `cert` authentication).
    #[serde(default)]
    pub sslcert: Option<String>,
    /// PEM file of the client certificate's private key.
    #[serde(default)]
    pub sslkey: Option<String>,
    /// Connections for applying; partitions share them.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Giving up on a connection attempt after this long.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TCP keepalive probes after this long idle (then every
    /// `keepalives_idle / 3`, 3 times): a half-open connection is found
    /// instead of stalling a batch for the kernel's two hours.
    #[serde(default = "default_keepalives_idle", with = "humantime_serde")]
    pub keepalives_idle: Duration,
    /// Linux `TCP_USER_TIMEOUT`: a connection whose sent data stays
    /// unacknowledged this long is dropped ("0s": the kernel's default).
    #[serde(default = "default_tcp_user_timeout", with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on the apply connections: a
    /// statement running longer is cancelled and its batch retried.
    #[serde(default = "default_statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// How long a batch waits for a free pooled connection before it is
    /// retried (with the backoff) instead of queueing without end.
    #[serde(default = "default_pool_wait_timeout", with = "humantime_serde")]
    pub pool_wait_timeout: Duration,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_keepalives_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_tcp_user_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_wait_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// A batch closes at this many changes…
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// …or this many bytes of message payload…
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// A message (key + value) larger than this goes to the dead-letter
    /// topic instead of being applied.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// …or when its first change has waited this long.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// A partition held by a fault the worker waits out (registry,
    /// missing grant, missing column) for longer than this makes `/readyz`
    /// answer 503 naming it.
    #[serde(default = "default_unready_after", with = "humantime_serde")]
    pub unready_after: Duration,
}

fn default_unready_after() -> Duration {
    Duration::from_secs(30)
}

fn default_batch_max_rows() -> usize {
    DEFAULT_BATCH_MAX_ROWS
}
fn default_batch_max_bytes() -> usize {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_linger_ms() -> u64 {
    DEFAULT_LINGER_MS
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_max_rows: DEFAULT_BATCH_MAX_ROWS,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            linger_ms: DEFAULT_LINGER_MS,
            unready_after: default_unready_after(),
        }
    }
}

impl ApplyConfig {
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint with /metrics, /healthz and /readyz.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_string()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.to_string(),
        }
    }
}

/// One replicated table: which source topics feed it and how.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Source topics as the source region's Debezium names them, without the
    /// region prefix MirrorMaker 2 adds (e.g. `cdc.public.users`, or
    /// `cdc.avro.public.users` for the Avro connector).
    pub topics: Vec<String>,
    /// The target table, `schema.table`.
    pub target: String,
    /// The target's key columns (its primary key).
    pub key: Vec<String>,
    /// Source column → target column, where names differ.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// The source table (`schema.table`) whose events the topics carry;
    /// default: the last two dot-separated parts of each topic name, as
    /// Debezium names topics. An event of any other table is rejected.
    #[serde(default)]
    pub source_table: Option<String>,
    /// The column whose value homes a row (DESIGN.md §3), or `"shared"`
    /// (the default): no row has a home and every write is applied under
    /// the version guard.
    #[serde(default = "default_affinity")]
    pub affinity: String,
    /// A target column naming a row's home region explicitly (a pin); where
    /// it is NULL the affinity column decides.
    #[serde(default)]
    pub home_region_column: Option<String>,
    /// What a remote region's write to a row homed here does.
    #[serde(default)]
    pub policy: Policy,
    /// Data residency per row: a row whose `home_region_column` names a
    /// region matching one of these patterns (a region name, or a prefix
    /// ending in `*` such as `"eu-*"`) is stored only in the regions that
    /// match the same pattern; a worker elsewhere never writes it.
    #[serde(default)]
    pub residency: Vec<String>,
    /// CRDT counters: counter column → its jsonb companion of per-region
    /// components (schemas/regionsync.sql, `regionsync.count_by_region`).
    /// Merged whatever the row's version, so no region's increments are lost.
    #[serde(default)]
    pub counters: BTreeMap<String, String>,
    /// Source columns deliberately not replicated (the target lacks them by
    /// design). Any other source column the target does not have, and never
    /// had, holds the partition until it is added (docs/SCHEMA-CHANGES.md).
    #[serde(default)]
    pub ignore_columns: Vec<String>,
    /// This table's `on_schema_mismatch`; default: the global one.
    #[serde(default)]
    pub on_schema_mismatch: Option<OnSchemaMismatch>,
}

/// The `affinity` value of a table whose rows have no home.
pub const SHARED: &str = "shared";

fn default_affinity() -> String {
    SHARED.to_string()
}

impl TableConfig {
    /// Whether rows have a home region (an affinity column or a pin column).
    pub fn is_homed(&self) -> bool {
        self.affinity != SHARED || self.home_region_column.is_some()
    }

    /// Whether an event of source table `schema.table` read from `topic`
    /// belongs to this table.
    pub fn accepts_source(&self, topic: &str, schema: &str, table: &str) -> bool {
        match &self.source_table {
            Some(st) => st.split_once('.') == Some((schema, table)),
            None => topic.ends_with(&format!(".{schema}.{table}")),
        }
    }

    /// (schema, table) of the target.
    pub fn target_parts(&self) -> (&str, &str) {
        match self.target.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("public", self.target.as_str()),
        }
    }

    /// The target column a source column maps to.
    pub fn target_column<'a>(&'a self, source: &'a str) -> &'a str {
        self.columns
            .get(source)
            .map(String::as_str)
            .unwrap_or(source)
    }
}

/// A secret string: never printed, never logged.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Everything wrong with a configuration, each naming its field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// The keys of [`Config`]: other `REGIONSYNC_*` variables (such as
/// `REGIONSYNC_CONFIG`) are not overrides.
const TOP_LEVEL_KEYS: &[&str] = &[
    "region",
    "regions",
    "source_regions",
    "consumer_group",
    "on_error",
    "dlq_topic",
    "kafka",
    "schema_registry",
    "postgres",
    "apply",
    "metrics",
    "heartbeat_topic",
    "max_clock_skew",
    "clock_ahead",
    "tombstone_grace",
    "late_changes",
    "conflicts",
    "tables",
];

/// Whether `s` can name a region: non-empty; ASCII letters, digits, `-`
/// and `_`.
pub fn is_region_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// What is wrong with an ordered region list (the config's `regions`, or
/// `regionsync route --regions`), each problem prefixed with `field`: it
/// must be non-empty, and each entry a region name listed once.
pub fn region_list_problems(field: &str, regions: &[String]) -> Vec<String> {
    let mut p = Vec::new();
    if regions.is_empty() {
        p.push(format!("{field}: must list every region, in routing order"));
    }
    for (i, r) in regions.iter().enumerate() {
        if !is_region_name(r) {
            p.push(format!("{field}[{i}]: {r:?} is not a region name"));
        }
        if regions[..i].contains(r) {
            p.push(format!("{field}[{i}]: {r:?} is listed twice"));
        }
    }
    p
}

/// A secret given inline (or from the environment), else read from `file`
/// (without its trailing newline). The error names the file, never the
/// content.
fn secret(
    field: &str,
    inline: &Option<Secret>,
    file: &Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(p) = inline {
        return Ok(Some(p.clone()));
    }
    match file {
        Some(file) => std::fs::read_to_string(file)
            .map(|s| Some(Secret::new(s.trim_end_matches(['\n', '\r']))))
            .map_err(|e| ConfigError {
                problems: vec![format!("{field} {file}: {e}")],
            }),
        None => Ok(None),
    }
}

/// Problems of a secret given both inline and as a file, or as a file that
/// cannot be read.
fn secret_problems(p: &mut Vec<String>, field: &str, inline: bool, file: &Option<String>) {
    if inline && file.is_some() {
        p.push(format!("{field} and {field}_file: set only one"));
    }
    if let Some(file) = file {
        if !Path::new(file).is_file() {
            p.push(format!("{field}_file: {file} is not a readable file"));
        }
    }
}

/// A problem if the file a key names does not exist.
fn file_problem(p: &mut Vec<String>, field: &str, file: &Option<String>, what: &str) {
    if let Some(file) = file {
        if !Path::new(file).is_file() {
            p.push(format!("{field}: {file} ({what}) is not a readable file"));
        }
    }
}

/// The first segment of an environment key (`postgres.host` → `postgres`).
fn top_level(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

impl Config {
    /// Reads the TOML file, then applies `REGIONSYNC_*` environment
    /// overrides, then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError {
                problems: vec![format!("config file {} does not exist", path.display())],
            });
        }
        let figment = Figment::new().merge(Toml::file_exact(path)).merge(
            Env::prefixed("REGIONSYNC_").split("__").filter(|key| {
                let top = top_level(key.as_str());
                TOP_LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(top))
            }),
        );
        let config: Config = figment.extract().map_err(|e| ConfigError {
            problems: e
                .into_iter()
                .map(|e| format!("{e} (in {})", path.display()))
                .collect(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without the environment (tests, check-config).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError {
                problems: e.into_iter().map(|e| e.to_string()).collect(),
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn consumer_group(&self) -> String {
        self.consumer_group
            .clone()
            .unwrap_or_else(|| format!("regionsync-{}", self.region))
    }

    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("regionsync.dlq.{}", self.region))
    }

    /// The regions whose topics this worker consumes.
    pub fn source_regions(&self) -> Vec<String> {
        if self.source_regions.is_empty() {
            self.regions
                .iter()
                .filter(|r| **r != self.region)
                .cloned()
                .collect()
        } else {
            self.source_regions.clone()
        }
    }

    /// The registry URL for events from `region`, if any is configured.
    pub fn registry_for(&self, region: &str) -> Option<&str> {
        self.schema_registry
            .per_region
            .get(region)
            .or(self.schema_registry.url.as_ref())
            .map(String::as_str)
    }

    /// The password, from the config/environment or from `password_file`.
    pub fn postgres_password(&self) -> Result<Option<Secret>, ConfigError> {
        secret(
            "postgres.password_file",
            &self.postgres.password,
            &self.postgres.password_file,
        )
    }

    /// The SASL password, from the config/environment or its file.
    pub fn kafka_sasl_password(&self) -> Result<Option<Secret>, ConfigError> {
        secret(
            "kafka.sasl_password_file",
            &self.kafka.sasl_password,
            &self.kafka.sasl_password_file,
        )
    }

    /// The registry's password, from the config/environment or its file.
    pub fn registry_password(&self) -> Result<Option<Secret>, ConfigError> {
        secret(
            "schema_registry.password_file",
            &self.schema_registry.password,
            &self.schema_registry.password_file,
        )
    }

    /// The registry's bearer token, from the config/environment or its file.
    pub fn registry_token(&self) -> Result<Option<Secret>, ConfigError> {
        secret(
            "schema_registry.token_file",
            &self.schema_registry.token,
            &self.schema_registry.token_file,
        )
    }

    /// The exact mirrored topic names this worker consumes, with the table
    /// each feeds (`None` for heartbeat topics).
    pub fn mirrored_topics(&self) -> Vec<(String, String, Option<usize>)> {
        let mut out = Vec::new();
        for region in self.source_regions() {
            out.push((
                format!("{region}.{}", self.heartbeat_topic),
                region.clone(),
                None,
            ));
            for (i, table) in self.tables.iter().enumerate() {
                for topic in &table.topics {
                    out.push((format!("{region}.{topic}"), region.clone(), Some(i)));
                }
            }
        }
        out
    }

    /// The problems of the TLS, SASL and registry credential keys: files
    /// that are missing, halves of a pair, a mechanism without credentials.
    fn tls_problems(&self, p: &mut Vec<String>) {
        let pg = &self.postgres;
        file_problem(
            p,
            "postgres.sslrootcert",
            &pg.sslrootcert,
            "the CA certificate",
        );
        file_problem(p, "postgres.sslcert", &pg.sslcert, "the client certificate");
        file_problem(p, "postgres.sslkey", &pg.sslkey, "the client key");
        match (&pg.sslcert, &pg.sslkey) {
            (None, Some(_)) => p.push(
                "postgres.sslkey: a client key without a certificate; set postgres.sslcert too"
                    .into(),
            ),
            (Some(_), None) => p.push(
                "postgres.sslcert: a client certificate without its key; set postgres.sslkey too"
                    .into(),
            ),
            _ => {}
        }
        if matches!(pg.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && pg.sslrootcert.is_none()
        {
            p.push(format!(
                "postgres.sslrootcert: sslmode {} needs the CA that signed the server's certificate",
                pg.sslmode.as_str()
            ));
        }
        if pg.sslmode == SslMode::Disable && (pg.sslrootcert.is_some() || pg.sslcert.is_some()) {
            p.push("postgres.sslmode: disable, but sslrootcert or sslcert is set".into());
        }

        let k = &self.kafka;
        file_problem(
            p,
            "kafka.ssl_ca_location",
            &k.ssl_ca_location,
            "the CA certificate",
        );
        secret_problems(
            p,
            "kafka.sasl_password",
            k.sasl_password.is_some(),
            &k.sasl_password_file,
        );
        let protocol = k.security_protocol.unwrap_or(SecurityProtocol::Plaintext);
        let has_password = k.sasl_password.is_some() || k.sasl_password_file.is_some();
        match k.sasl_mechanism {
            Some(m) => {
                if !protocol.is_sasl() {
                    p.push(format!(
                        "kafka.sasl_mechanism: {} needs security_protocol sasl_ssl (or sasl_plaintext), not {}",
                        m.as_str(),
                        protocol.as_str()
                    ));
                }
                if k.sasl_username.is_none() || !has_password {
                    p.push(format!(
                        "kafka.sasl_mechanism: {} needs credentials: sasl_username and sasl_password (or sasl_password_file)",
                        m.as_str()
                    ));
                }
            }
            None => {
                if protocol.is_sasl() && !k.properties.contains_key("sasl.mechanism") {
                    p.push(format!(
                        "kafka.security_protocol: {} needs sasl_mechanism (SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN)",
                        protocol.as_str()
                    ));
                }
                if k.sasl_username.is_some() || has_password {
                    p.push(
                        "kafka.sasl_username / sasl_password: set, but no sasl_mechanism".into(),
                    );
                }
            }
        }
        if k.ssl_ca_location.is_some() && !protocol.is_tls() {
            p.push(format!(
                "kafka.ssl_ca_location: set, but security_protocol is {} (use ssl or sasl_ssl)",
                protocol.as_str()
            ));
        }

        let r = &self.schema_registry;
        file_problem(
            p,
            "schema_registry.ca_file",
            &r.ca_file,
            "the CA certificate",
        );
        secret_problems(
            p,
            "schema_registry.password",
            r.password.is_some(),
            &r.password_file,
        );
        secret_problems(p, "schema_registry.token", r.token.is_some(), &r.token_file);
        let has_password = r.password.is_some() || r.password_file.is_some();
        let has_token = r.token.is_some() || r.token_file.is_some();
        if has_token && (r.username.is_some() || has_password) {
            p.push(
                "schema_registry.token: a bearer token, or username and password, not both".into(),
            );
        }
        if has_password && r.username.is_none() {
            p.push("schema_registry.password: set, but no schema_registry.username".into());
        }
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if !is_region_name(&self.region) {
            p.push(format!(
                "region: {:?} is not a region name (letters, digits, - and _)",
                self.region
            ));
        }
        p.extend(region_list_problems("regions", &self.regions));
        if !self.regions.contains(&self.region) {
            p.push(format!(
                "region: {:?} is not in regions {:?}",
                self.region, self.regions
            ));
        }
        for (i, r) in self.source_regions.iter().enumerate() {
            if !self.regions.contains(r) {
                p.push(format!("source_regions[{i}]: {r:?} is not in regions"));
            }
            if *r == self.region {
                p.push(format!(
                    "source_regions[{i}]: {r:?} is this worker's own region"
                ));
            }
        }
        if self.source_regions().is_empty() {
            p.push("source_regions: no region to consume from".into());
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            p.push("kafka.bootstrap_servers: must not be empty".into());
        }
        for key in self.kafka.properties.keys() {
            if matches!(
                key.as_str(),
                "group.id" | "enable.auto.commit" | "bootstrap.servers"
            ) {
                p.push(format!(
                    "kafka.properties.{key}: set by regionsync itself (use consumer_group / kafka.bootstrap_servers)"
                ));
            }
        }
        for (region, url) in &self.schema_registry.per_region {
            if !self.regions.contains(region) {
                p.push(format!(
                    "schema_registry.per_region.{region}: not in regions"
                ));
            }
            if !url.starts_with("http://") && !url.starts_with("https://") {
                p.push(format!(
                    "schema_registry.per_region.{region}: {url:?} is not an http(s) URL"
                ));
            }
        }
        if let Some(url) = &self.schema_registry.url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                p.push(format!(
                    "schema_registry.url: {url:?} is not an http(s) URL"
                ));
            }
        }
        if self.postgres.host.is_empty() {
            p.push("postgres.host: must not be empty".into());
        }
        if let Some(a) = &self.postgres.hostaddr {
            if a.parse::<std::net::IpAddr>().is_err() {
                p.push(format!("postgres.hostaddr: {a:?} is not an IP address"));
            }
        }
        if self.postgres.dbname.is_empty() {
            p.push("postgres.dbname: must not be empty".into());
        }
        if self.postgres.user.is_empty() {
            p.push("postgres.user: must not be empty".into());
        }
        secret_problems(
            &mut p,
            "postgres.password",
            self.postgres.password.is_some(),
            &self.postgres.password_file,
        );
        self.tls_problems(&mut p);
        if self.postgres.pool_size == 0 || self.postgres.pool_size > 64 {
            p.push(format!(
                "postgres.pool_size: {} is outside 1..=64",
                self.postgres.pool_size
            ));
        }
        for (key, d) in [
            ("postgres.connect_timeout", self.postgres.connect_timeout),
            ("postgres.keepalives_idle", self.postgres.keepalives_idle),
            (
                "postgres.statement_timeout",
                self.postgres.statement_timeout,
            ),
            (
                "postgres.pool_wait_timeout",
                self.postgres.pool_wait_timeout,
            ),
        ] {
            if d < Duration::from_secs(1) {
                p.push(format!("{key}: {d:?} is below 1s"));
            }
        }
        if self.apply.batch_max_rows == 0 || self.apply.batch_max_rows > 100_000 {
            p.push(format!(
                "apply.batch_max_rows: {} is outside 1..=100000",
                self.apply.batch_max_rows
            ));
        }
        if self.apply.batch_max_bytes < 1024 {
            p.push(format!(
                "apply.batch_max_bytes: {} is below 1024",
                self.apply.batch_max_bytes
            ));
        }
        if self.apply.linger_ms > 60_000 {
            p.push(format!(
                "apply.linger_ms: {} is above 60000",
                self.apply.linger_ms
            ));
        }
        if self.tombstone_grace < Duration::from_secs(1) {
            p.push("tombstone_grace: must be at least 1s (e.g. \"7d\")".into());
        }
        if self.conflicts.retention < Duration::from_secs(1) {
            p.push("conflicts.retention: must be at least 1s (e.g. \"30d\")".into());
        }
        if self.max_clock_skew.is_zero() {
            p.push("max_clock_skew: must be above zero (e.g. \"5s\")".into());
        }
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "metrics.listen: {:?} is not an address like 127.0.0.1:9464",
                self.metrics.listen
            ));
        }
        if self.tables.is_empty() {
            p.push("tables: at least one replicated table is needed".into());
        }
        let mut seen_topics: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, t) in self.tables.iter().enumerate() {
            if t.topics.is_empty() {
                p.push(format!("tables[{i}].topics: must name at least one topic"));
            }
            for topic in &t.topics {
                if let Some(j) = seen_topics.insert(topic, i) {
                    p.push(format!(
                        "tables[{i}].topics: {topic:?} already feeds tables[{j}]"
                    ));
                }
                if *topic == self.heartbeat_topic {
                    p.push(format!(
                        "tables[{i}].topics: {topic:?} is the heartbeat topic"
                    ));
                }
            }
            let parts: Vec<&str> = t.target.split('.').collect();
            if parts.len() > 2 || parts.iter().any(|s| s.is_empty()) {
                p.push(format!(
                    "tables[{i}].target: {:?} is not schema.table",
                    t.target
                ));
            }
            if t.key.is_empty() {
                p.push(format!("tables[{i}].key: must name the key columns"));
            }
            if t.affinity.trim().is_empty() {
                p.push(format!(
                    "tables[{i}].affinity: must name a column or be \"{SHARED}\""
                ));
            }
            if !t.residency.is_empty() && t.home_region_column.is_none() {
                p.push(format!(
                    "tables[{i}].residency: needs home_region_column, the column that pins a row"
                ));
            }
            for (j, pattern) in t.residency.iter().enumerate() {
                if !is_region_name(pattern.strip_suffix('*').unwrap_or(pattern)) {
                    p.push(format!(
                        "tables[{i}].residency[{j}]: {pattern:?} is neither a region name nor a prefix ending in *"
                    ));
                }
            }
            for (j, c) in t.ignore_columns.iter().enumerate() {
                if t.key.contains(c)
                    || t.target_column(c) == "hlc"
                    || t.target_column(c) == "origin_region"
                {
                    p.push(format!(
                        "tables[{i}].ignore_columns[{j}]: {c:?} is a key or version column, which every change needs"
                    ));
                }
            }
            if t.policy != Policy::Lww && !t.is_homed() {
                p.push(format!(
                    "tables[{i}].policy: {:?} needs rows with a home region; set affinity to a column or home_region_column",
                    t.policy.as_str()
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        region = "eu-west-1"
        regions = ["us-east-1", "eu-west-1"]
        [kafka]
        bootstrap_servers = "127.0.0.1:29092"
        [postgres]
        host = "127.0.0.1"
        dbname = "app"
        user = "regionsync"
        password = "s3cret"
        [[tables]]
        topics = ["cdc.public.users"]
        target = "public.users"
        key = ["id"]
    "#;

    #[test]
    fn a_minimal_config_gets_its_defaults() {
        let c = Config::from_toml(GOOD).expect("valid");
        assert_eq!(c.consumer_group(), "regionsync-eu-west-1");
        assert_eq!(c.dlq_topic(), "regionsync.dlq.eu-west-1");
        assert_eq!(c.source_regions(), vec!["us-east-1".to_string()]);
        assert_eq!(c.on_error, OnError::Dlq);
        assert_eq!(c.apply.batch_max_rows, DEFAULT_BATCH_MAX_ROWS);
        assert_eq!(c.max_clock_skew, Duration::from_secs(5));
        assert_eq!(c.tombstone_grace, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.late_changes, LateChanges::Skip);
        assert_eq!(c.conflicts.retention, Duration::from_secs(30 * 24 * 3600));
        let topics: Vec<String> = c.mirrored_topics().into_iter().map(|t| t.0).collect();
        assert_eq!(
            topics,
            vec![
                "us-east-1.cdc.regionsync.heartbeat".to_string(),
                "us-east-1.cdc.public.users".to_string()
            ]
        );
    }

    #[test]
    fn a_policy_other_than_lww_needs_a_home() {
        let shared = GOOD.replace("key = [\"id\"]", "key = [\"id\"]\npolicy = \"reject\"");
        let text = Config::from_toml(&shared).unwrap_err().to_string();
        assert!(
            text.contains("tables[0].policy: \"reject\" needs rows with a home region"),
            "{text}"
        );
        let homed = shared.replace("policy = ", "affinity = \"id\"\npolicy = ");
        let c = Config::from_toml(&homed).expect("valid");
        assert_eq!(c.tables[0].policy, Policy::Reject);
        assert!(c.tables[0].is_homed());
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(
            (c.tables[0].policy, c.tables[0].is_homed()),
            (Policy::Lww, false)
        );
    }

    #[test]
    fn residency_needs_the_pin_column_and_region_patterns() {
        let bad = GOOD.replace(
            "key = [\"id\"]",
            "key = [\"id\"]\nresidency = [\"eu-*\", \"*x\"]",
        );
        let text = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(
            text.contains("tables[0].residency: needs home_region_column"),
            "{text}"
        );
        assert!(text.contains("tables[0].residency[1]: \"*x\""), "{text}");
        let good = GOOD.replace(
            "key = [\"id\"]",
            "key = [\"id\"]\nhome_region_column = \"home_region\"\nresidency = [\"eu-*\"]",
        );
        assert_eq!(
            Config::from_toml(&good).unwrap().tables[0].residency,
            ["eu-*"]
        );
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let c = Config::from_toml(GOOD).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn no_secret_shows_in_debug_output() {
        let c = Config::from_toml(&GOOD.replace(
            "bootstrap_servers = \"127.0.0.1:29092\"",
            "bootstrap_servers = \"127.0.0.1:29092\"\nsecurity_protocol = \"sasl_ssl\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"rs\"\n\
             sasl_password = \"kafka-s3cret\"\n\
             properties = { \"sasl.oauthbearer.config\" = \"oauth-s3cret\", \"ssl.key.password\" = \"key-s3cret\", \"client.id\" = \"shown\" }\n\
             [schema_registry]\nurl = \"https://r\"\ntoken = \"token-s3cret\"",
        ))
        .unwrap();
        let printed = format!("{c:?}");
        for secret in [
            "s3cret",
            "kafka-s3cret",
            "oauth-s3cret",
            "key-s3cret",
            "token-s3cret",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("shown"), "{printed}");
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("kafka-s3cret") && !json.contains("token-s3cret"));
    }

    #[test]
    fn tls_and_sasl_problems_are_named_before_connecting() {
        let bad = GOOD
            .replace(
                "bootstrap_servers = \"127.0.0.1:29092\"",
                "bootstrap_servers = \"127.0.0.1:29092\"\nsasl_mechanism = \"PLAIN\"\n\
                 ssl_ca_location = \"/nonexistent/kafka-ca.pem\"",
            )
            .replace(
                "password = \"s3cret\"",
                "password = \"s3cret\"\nsslmode = \"verify-full\"\nsslkey = \"/nonexistent/k.pem\"",
            );
        let text = Config::from_toml(&bad).unwrap_err().to_string();
        for expected in [
            "kafka.ssl_ca_location: /nonexistent/kafka-ca.pem (the CA certificate) is not a readable file",
            "kafka.ssl_ca_location: set, but security_protocol is plaintext",
            "kafka.sasl_mechanism: PLAIN needs security_protocol sasl_ssl",
            "kafka.sasl_mechanism: PLAIN needs credentials",
            "postgres.sslkey: a client key without a certificate",
            "postgres.sslrootcert: sslmode verify-full needs the CA",
        ] {
            assert!(text.contains(expected), "{expected:?} not in {text}");
        }
        assert!(!text.contains("s3cret"), "{text}");
        let protocol_only = GOOD.replace(
            "bootstrap_servers = \"127.0.0.1:29092\"",
            "bootstrap_servers = \"127.0.0.1:29092\"\nsecurity_protocol = \"sasl_ssl\"",
        );
        let text = Config::from_toml(&protocol_only).unwrap_err().to_string();
        assert!(
            text.contains("kafka.security_protocol: sasl_ssl needs sasl_mechanism"),
            "{text}"
        );
    }

    #[test]
    fn secrets_are_read_from_their_files_without_the_newline() {
        let dir = std::env::temp_dir().join(format!("regionsync-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sasl");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let text = GOOD.replace(
            "bootstrap_servers = \"127.0.0.1:29092\"",
            &format!(
                "bootstrap_servers = \"127.0.0.1:29092\"\nsecurity_protocol = \"sasl_ssl\"\n\
                 sasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"rs\"\nsasl_password_file = {:?}",
                file.display().to_string()
            ),
        );
        let c = Config::from_toml(&text).unwrap();
        let password = c.kafka_sasl_password().unwrap().unwrap();
        assert_eq!(password.expose(), "from-a-file");
        let both = text.replace(
            "sasl_username = \"rs\"",
            "sasl_username = \"rs\"\nsasl_password = \"x\"",
        );
        let err = Config::from_toml(&both).unwrap_err().to_string();
        assert!(
            err.contains("kafka.sasl_password and kafka.sasl_password_file: set only one"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let bad = GOOD
            .replace(
                "regions = [\"us-east-1\", \"eu-west-1\"]",
                "regions = [\"us-east-1\"]",
            )
            .replace("key = [\"id\"]", "key = []")
            .replace("target = \"public.users\"", "target = \"a.b.c\"");
        let err = Config::from_toml(&bad).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("region: \"eu-west-1\" is not in regions"),
            "{text}"
        );
        assert!(text.contains("tables[0].key"), "{text}");
        assert!(text.contains("tables[0].target"), "{text}");
    }

    #[test]
    fn the_region_list_must_be_nonempty_unique_and_hold_the_local_region() {
        let dup = GOOD.replace(
            "regions = [\"us-east-1\", \"eu-west-1\"]",
            "regions = [\"us-east-1\", \"eu-west-1\", \"us-east-1\", \"a b\"]",
        );
        let text = Config::from_toml(&dup).unwrap_err().to_string();
        assert!(
            text.contains("regions[2]: \"us-east-1\" is listed twice"),
            "{text}"
        );
        assert!(
            text.contains("regions[3]: \"a b\" is not a region name"),
            "{text}"
        );
        let empty = GOOD.replace("regions = [\"us-east-1\", \"eu-west-1\"]", "regions = []");
        let text = Config::from_toml(&empty).unwrap_err().to_string();
        assert!(text.contains("regions: must list every region"), "{text}");
        assert!(
            text.contains("region: \"eu-west-1\" is not in regions"),
            "{text}"
        );
        assert_eq!(
            region_list_problems("--regions", &["x".into(), "x".into()]),
            vec!["--regions[1]: \"x\" is listed twice".to_string()]
        );
    }

    #[test]
    fn max_clock_skew_reads_human_durations_and_names_bad_ones() {
        let c = Config::from_toml(&format!("max_clock_skew = \"500ms\"\n{GOOD}")).unwrap();
        assert_eq!(c.max_clock_skew, Duration::from_millis(500));
        let c = Config::from_toml(&format!("max_clock_skew = \"1m 30s\"\n{GOOD}")).unwrap();
        assert_eq!(c.max_clock_skew, Duration::from_secs(90));
        for bad in ["\"5 parsecs\"", "\"5\"", "5"] {
            let err = Config::from_toml(&format!("max_clock_skew = {bad}\n{GOOD}")).unwrap_err();
            assert!(err.to_string().contains("max_clock_skew"), "{bad}: {err}");
        }
        let err = Config::from_toml(&format!("max_clock_skew = \"0s\"\n{GOOD}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("max_clock_skew: must be above zero"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml(&format!("{GOOD}\nbatch_size = 3")).unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn the_environment_overrides_any_key_and_other_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("regionsync.toml", GOOD)?;
            jail.set_env("REGIONSYNC_POSTGRES__HOST", "db.internal");
            jail.set_env("REGIONSYNC_APPLY__BATCH_MAX_ROWS", "123");
            jail.set_env("REGIONSYNC_MAX_CLOCK_SKEW", "750ms");
            jail.set_env("REGIONSYNC_CONFIG", "regionsync.toml");
            jail.set_env("REGIONSYNC_DEBEZIUM_PASSWORD", "not-ours");
            let c = Config::load(Path::new("regionsync.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.postgres.host, "db.internal");
            assert_eq!(c.apply.batch_max_rows, 123);
            assert_eq!(c.max_clock_skew, Duration::from_millis(750));
            Ok(())
        });
    }
}
