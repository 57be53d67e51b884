//! The `regionsync` command: a thin CLI over the library. Parses the
//! command line, loads the configuration, sets up logging and the
//! allocator, dispatches to `regionsync::run` or one of `regionsync::ops`,
//! and turns the result into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use regionsync::config::Config;
use regionsync::ops;

// The worker allocates and frees many small values per change (decoded rows,
// SQL text arrays); mimalloc does this at a fraction of glibc malloc's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's option enum (v2 and v3); the sys
/// crate names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc return freed pages to the OS at once. Its default (1 s,
/// ten times that for whole arenas) let a replay's RSS creep up by about
/// 40 MB over a minute, past 150 MB (make bench); at once, it stays near
/// 110 MB. `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn purge_freed_memory_at_once() {
    // SAFETY: sets a plain option value; mimalloc reads options at any time.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 0) };
}

/// Applies mirrored Debezium change events from Kafka to this region's
/// PostgreSQL, exactly once in effect.
#[derive(Parser, Debug)]
#[command(name = "regionsync", version, about, long_about = None)]
struct Cli {
    /// The configuration file (TOML). Every key can be overridden from the
    /// environment: REGIONSYNC_<KEY>, nested keys joined by "__", e.g.
    /// REGIONSYNC_POSTGRES__PASSWORD.
    #[arg(
        long,
        short,
        env = "REGIONSYNC_CONFIG",
        default_value = "regionsync.toml",
        global = true
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the worker until SIGTERM or Ctrl-C; SIGHUP reloads the
    /// configuration file (docs/CONFIG.md, "Reloading").
    Run,
    /// Validate the configuration and name every bad field; exits non-zero
    /// if any.
    CheckConfig,
    /// Create the regionsync schema in the target database (idempotent) and
    /// report what it cannot fix.
    Setup,
    /// Print one running worker's picture: per source region lag, heartbeat
    /// age, events/s, applied changes; dead letters and conflicts. Reads the
    /// worker's metrics endpoint (`metrics.listen` of the config, or --url).
    Status {
        /// The worker's metrics endpoint, e.g. http://127.0.0.1:29464
        /// (default: from `metrics.listen` in the config).
        #[arg(long)]
        url: Option<String>,
        /// Seconds between the two scrapes that give the rates (0: one
        /// scrape, no rates).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// List or resolve the conflicts recorded in this region's database
    /// (table regionsync.conflicts, DESIGN.md §4).
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// List the dead letters of this region's dead-letter topic, or replay
    /// them once their cause is fixed (docs/RUNBOOK.md, "Dead letters").
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print the home region of an affinity key (DESIGN.md §3).
    ///
    /// The region list's entry at jump_consistent_hash(xxh64(KEY as UTF-8,
    /// seed 0), number of regions), as the library's route::home_region
    /// computes it; the module docs of src/route.rs specify it.
    Route {
        /// The affinity key, hashed as its exact UTF-8 text (a number as
        /// its decimal text). A key that looks like an option goes after
        /// `--`.
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Every region in routing order, comma-separated, e.g.
        /// us-east-1,eu-west-1. Default: `regions` from the config file.
        #[arg(long, value_delimiter = ',')]
        regions: Option<Vec<String>>,
        /// The home for a write committed now, with the failover homing
        /// (`regionsync rehome`) read from this region's database: what a
        /// load balancer must follow. Exit 2 if the database does not
        /// answer.
        #[arg(long, conflicts_with = "regions")]
        current: bool,
    },
    /// Fail a region's rows over to another region, or back (DESIGN.md §3,
    /// RUNBOOK.md "Regional failover"). Writes the same homing, with a new
    /// epoch, into this region's database and every --peer-config's; fails
    /// naming any region it could not write.
    Rehome {
        /// The region whose rows move (the failed one).
        #[arg(long)]
        region: String,
        /// The region that is their home from now on.
        #[arg(long, required_unless_present = "back", conflicts_with = "back")]
        to: Option<String>,
        /// The region is home again.
        #[arg(long)]
        back: bool,
        /// With --back: writes committed during this much longer still
        /// belong to the acting home (while the load balancer moves the
        /// users back), e.g. 10s.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, requires = "back")]
        drain: std::time::Duration,
        /// The configuration of another region's worker, whose database is
        /// written too (repeat for each region).
        #[arg(long = "peer-config")]
        peer_configs: Vec<PathBuf>,
    },
    /// Say whether this region may take over from the others now: every
    /// mirrored partition applied to its high watermark (or its oldest
    /// unapplied message younger than --max-lag), the newest heartbeat of
    /// each source region younger than --max-lag, the worker ready, no
    /// unsettled conflicts. Exit 0: it may; 1: it may not (each reason
    /// printed: source region, partition, seconds and messages behind); 2:
    /// cannot tell (database, Kafka or worker unreachable).
    FailoverCheck {
        /// The most a source region may be behind, e.g. 30s, 2m.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        max_lag: std::time::Duration,
        /// The worker's metrics endpoint, for /readyz (default: from
        /// `metrics.listen` in the config).
        #[arg(long)]
        url: Option<String>,
        /// Print the verdict, reasons and facts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare this region's tables with another region's database, row by
    /// row, by key-range checksums computed in PostgreSQL; print each
    /// differing key (missing here, missing there, different) with both
    /// versions. Read-only on both sides. Exit 0 equal, 1 different, 2
    /// could not compare.
    ///
    /// A key that differs only because a change is still in flight (its
    /// newer version is younger than the measured lag) is fetched again
    /// after the lag before it is reported.
    ///
    /// Example: PGPASSWORD=… regionsync --config eu-west-1.toml verify
    /// --against "host=pg.us-east-1 dbname=app user=regionsync_ro
    /// sslmode=verify-full sslrootcert=/etc/ca.pem" --table public.users
    #[command(verbatim_doc_comment)]
    Verify {
        /// The other region's database, as a libpq key=value string (host,
        /// hostaddr, port, dbname, user, sslmode, sslrootcert, sslcert,
        /// sslkey). Keys not given are this config's [postgres] values;
        /// the password comes from PGPASSWORD.
        #[arg(long)]
        against: String,
        /// Only this table (schema.table, as in the config); repeatable.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// The report as JSON on standard output.
        #[arg(long)]
        json: bool,
        /// List at most this many differing keys per table (the rest are
        /// counted).
        #[arg(long, default_value_t = 1000)]
        max_differences: usize,
    },
    /// Rebuild this region's copy of tables by replaying, from their first
    /// offsets, every change topic that holds their rows: the other
    /// regions' mirrored topics and this region's own capture topic.
    /// Same decode, routing and version rules as the worker; offsets of its
    /// own (consumer group <group>-rebuild), so it resumes after a kill and
    /// does nothing once finished. Into the live tables, which it empties
    /// first: the worker must be stopped (it holds an advisory lock the
    /// rebuild checks). With --shadow, into a shadow copy of each table
    /// (schema regionsync) while the worker keeps applying, then swapped
    /// in, in one transaction with the offsets, under a short ACCESS
    /// EXCLUSIVE lock of the live table (needs an owner-level role).
    /// Loads in bulk: each chunk of changes collapsed to the newest
    /// version per key and COPYed. Refuses topics that no longer hold the
    /// whole history. Waits out what the worker waits out (an outage, a
    /// grant); dead-letters what it dead-letters (a chunk PostgreSQL
    /// refuses is bisected down to the refused rows) to its dead-letter
    /// topic, once. Exit status: 0 rebuilt, 3 rebuilt with changes
    /// dead-lettered by this rebuild (regionsync dlq list; not those in
    /// the dead-letter topic already), 1 failed.
    ///
    /// Example: regionsync --config eu-west-1.toml rebuild --table public.users
    ///          regionsync --config eu-west-1-owner.toml rebuild --shadow --table public.users
    /// then:    regionsync --config eu-west-1.toml verify --against "host=pg.us-east-1 …"
    #[command(verbatim_doc_comment)]
    Rebuild {
        /// Only this table (schema.table, as in the config); repeatable.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Build into shadow tables while the worker keeps running, then
        /// swap them in (docs/RUNBOOK.md, "a region's copy is lost or
        /// suspected wrong").
        #[arg(long)]
        shadow: bool,
        /// Start over even if a rebuild of the table finished or is under
        /// way.
        #[arg(long)]
        restart: bool,
        /// A chunk (changes collapsed to the newest version per key, one
        /// bulk load and one transaction with its offsets) is written once
        /// it holds this many versions (rows to write): larger writes
        /// fewer rows when keys repeat, and holds more in memory. A chunk
        /// that collapses almost nothing (an insert-only topic) is written
        /// from a quarter of this on.
        #[arg(long, default_value_t = 200_000)]
        chunk_rows: usize,
        /// ... or once its versions (and each key's newest message, held
        /// undecoded until the chunk is written) take about this many MB of
        /// memory (twice that while one chunk is written and the next
        /// read), whatever the number of keys.
        #[arg(long, default_value_t = 256)]
        chunk_mb: usize,
        /// ... or once it has read this many messages since the last
        /// commit: what a rebuild killed before its next commit reads
        /// again.
        #[arg(long, default_value_t = 2_000_000)]
        chunk: usize,
        /// With --shadow: the longest the swap may hold the live tables'
        /// lock (seconds); past it the swap is rolled back whole and tried
        /// again after a new catch-up (3 attempts).
        #[arg(long, default_value_t = 60.0)]
        swap_timeout: f64,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ConflictsCommand {
    /// The newest conflicts first: id, when, table, key, kind, policy,
    /// resolution ("(pending)" until settled), then the local and the
    /// remote version (region, hlc, row as JSON) and the version the row
    /// has here now (what settling compares with).
    List {
        /// Only this table (schema.table).
        #[arg(long)]
        table: Option<String>,
        /// Only the unsettled ones (manual conflicts waiting for `resolve`,
        /// rejected writes whose home row is not written again yet).
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print them as a JSON array (each with `local`, `remote` and
        /// `current`, the row's version here now).
        #[arg(long)]
        json: bool,
    },
    /// Settle a conflict: write the kept version again in this region as a
    /// new local write, newer than both, which every region then applies.
    /// Run it in the region whose worker recorded the conflict.
    Resolve {
        /// The conflict's id (from `conflicts list`).
        id: i64,
        /// Which version every region ends with.
        #[arg(long, value_enum)]
        keep: regionsync::conflict::Keep,
    },
}

#[derive(clap::Subcommand, Debug)]
enum DlqCommand {
    /// The dead letters, oldest first: when, reason, table, key, the
    /// original topic/partition/offset, then the error. Read-only.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Send dead-lettered changes again through the worker's decode,
    /// routing, conflict check and version guard, once their cause is
    /// fixed (a column widened, a grant given, a table configured). Each
    /// change is applied in its own transaction; no stored offset moves
    /// and the dead letters stay in the topic. Running it twice changes
    /// nothing (the version guard). Exit 1 if any is still refused.
    ///
    /// Example: regionsync --config eu-west-1.toml dlq replay --reason schema_mismatch --table public.users --since 2h
    #[command(verbatim_doc_comment)]
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
    },
}

/// Which dead letters a `dlq` command reads.
#[derive(clap::Args, Debug)]
struct DlqFilter {
    /// Only this reason (the `regionsync.reason` header, e.g. bad_value,
    /// schema_mismatch, rejected_by_postgres).
    #[arg(long)]
    reason: Option<String>,
    /// Only this table (schema.table, as in the config).
    #[arg(long)]
    table: Option<String>,
    /// Only those dead-lettered since this time (2026-12-06T18:00:00Z) or
    /// for this long (90m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
}

impl DlqFilter {
    fn parse(self) -> anyhow::Result<ops::dlq::Filter> {
        let since_ms = self
            .since
            .map(|s| ops::dlq::parse_since(&s, std::time::SystemTime::now()))
            .transpose()
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(ops::dlq::Filter {
            reason: self.reason,
            table: self.table,
            since_ms,
        })
    }
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.command {
        // `status --url` needs no configuration.
        Command::Status {
            url: Some(url),
            interval,
        } => {
            let url = url.trim_end_matches('/').to_owned();
            let interval = *interval;
            return block_on(async move { ops::status::run(&url, seconds(interval)?).await });
        }
        Command::Route {
            key,
            regions,
            current: false,
        } => {
            return match ops::route::home(&cli.config, key, regions.as_deref()) {
                Ok(home) => {
                    println!("{home}");
                    ExitCode::SUCCESS
                }
                Err(problems) => {
                    for p in problems {
                        eprintln!("regionsync: {p}");
                    }
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regionsync: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Route {
        key, current: true, ..
    } = &cli.command
    {
        let key = key.clone();
        return match tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ops::route::current(&config, &key)))
        {
            Ok(home) => {
                println!("{home}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("regionsync: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::FailoverCheck { max_lag, url, json } = &cli.command {
        let url = url.clone().unwrap_or_else(|| worker_url(&config));
        let (max_lag, json) = (*max_lag, *json);
        return match tokio::runtime::Runtime::new() {
            Ok(rt) => {
                ExitCode::from(rt.block_on(ops::failover_check::run(&config, &url, max_lag, json)))
            }
            Err(e) => {
                eprintln!("regionsync: starting the runtime: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Verify {
        against,
        tables,
        json,
        max_differences,
    } = &cli.command
    {
        // Its own exit codes: 0 equal, 1 different, 2 could not compare.
        let outcome = tokio::runtime::Runtime::new()
            .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
            .and_then(|rt| {
                rt.block_on(ops::verify::run(
                    &config,
                    against,
                    tables,
                    *json,
                    *max_differences,
                ))
            });
        return match outcome {
            Ok(ops::verify::Outcome::Equal) => ExitCode::SUCCESS,
            Ok(ops::verify::Outcome::Different) => ExitCode::from(1),
            Err(e) => {
                eprintln!("regionsync: verify could not compare: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Rebuild {
        tables,
        shadow,
        restart,
        chunk_rows,
        chunk_mb,
        chunk,
        swap_timeout,
    } = &cli.command
    {
        // Its own exit codes: 0 done, 1 failed, 3 done with changes this
        // rebuild dead-lettered.
        // Under a second, PostgreSQL's timeouts (whole milliseconds, 0 =
        // none) would not bound the swap.
        let outcome = std::time::Duration::try_from_secs_f64(*swap_timeout)
            .ok()
            .filter(|t| t.as_secs() >= 1)
            .ok_or_else(|| {
                anyhow::anyhow!("--swap-timeout {swap_timeout}: not a number of seconds >= 1")
            })
            .and_then(|swap_timeout| {
                tokio::runtime::Runtime::new()
                    .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
                    .and_then(|rt| {
                        rt.block_on(async {
                            // Progress on a terminal or in the log; the
                            // rebuild's metrics on the worker's endpoint, which
                            // is free while the worker is stopped.
                            if let Err(e) = metrics_endpoint(&config).await {
                                tracing::warn!(error = %e, "rebuild metrics not served");
                            }
                            ops::rebuild::run(
                                &config,
                                tables,
                                *shadow,
                                *restart,
                                regionsync::rebuild::bulk::Limits {
                                    rows: (*chunk_rows).max(1),
                                    bytes: chunk_mb.saturating_mul(1 << 20).max(1),
                                    messages: (*chunk).max(1),
                                },
                                swap_timeout,
                            )
                            .await
                        })
                    })
            });
        return match outcome {
            Ok(f) if f.dead_lettered > 0 => {
                eprintln!(
                    "regionsync: rebuild finished, with {} change(s) dead-lettered by this rebuild (`regionsync dlq list`); exit status 3",
                    f.dead_lettered
                );
                ExitCode::from(3)
            }
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("regionsync: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    block_on(async move {
        match cli.command {
            Command::CheckConfig => {
                println!("{}: ok", cli.config.display());
                Ok(())
            }
            Command::Setup => ops::setup::run(&config).await,
            Command::Run => {
                regionsync::run_reloading(cli.config, config, shutdown_signal(), hangups()).await
            }
            Command::Status { interval, .. } => {
                ops::status::run(&worker_url(&config), seconds(interval)?).await
            }
            Command::Conflicts(ConflictsCommand::List {
                table,
                open,
                limit,
                json,
            }) => ops::conflicts::list(&config, table.as_deref(), open, limit, json).await,
            Command::Conflicts(ConflictsCommand::Resolve { id, keep }) => {
                ops::conflicts::resolve(&config, id, keep).await
            }
            Command::Rehome {
                region,
                to,
                back,
                drain,
                peer_configs,
            } => {
                let now = regionsync::clock::now_ms();
                let change = match (to, back) {
                    (Some(to), false) => ops::rehome::Change::Failover {
                        region,
                        to,
                        from_ms: now,
                    },
                    _ => ops::rehome::Change::Failback {
                        region,
                        until_ms: now + drain.as_millis() as i64,
                    },
                };
                ops::rehome::run(&config, &peer_configs, change).await
            }
            Command::Dlq(DlqCommand::List { filter, json }) => {
                ops::dlq::list(&config, &filter.parse()?, json).await
            }
            Command::Dlq(DlqCommand::Replay { filter }) => {
                ops::dlq::run_replay(&config, &filter.parse()?).await
            }
            Command::Route { .. } | Command::FailoverCheck { .. } => {
                unreachable!("handled above")
            }
            Command::Verify { .. } => unreachable!("handled with its own exit codes"),
            Command::Rebuild { .. } => unreachable!("handled with its own exit codes"),
        }
    })
}

/// The worker's metrics endpoint from `metrics.listen` of the config.
fn worker_url(config: &Config) -> String {
    format!(
        "http://{}",
        config.metrics.listen.replace("0.0.0.0", "127.0.0.1")
    )
}

/// Serves the process's metrics on `metrics.listen`.
async fn metrics_endpoint(config: &Config) -> anyhow::Result<()> {
    let handle = regionsync::metrics::install()?;
    regionsync::metrics::serve(
        config.metrics.listen.parse()?,
        handle,
        regionsync::metrics::Readiness::default(),
    )
    .await
}

/// Runs a command on a new runtime; its error is printed and fails the
/// process.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))
        .and_then(|runtime| runtime.block_on(command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regionsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(s: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("--interval {s}: not a number of seconds >= 0"))
}

/// One message per SIGHUP: reload the configuration
/// (`regionsync::run_reloading`). Listening replaces SIGHUP's default,
/// which would end the process.
fn hangups() -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP: no configuration reload"),
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_option_is_the_one_set_to_zero() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment's value wins, by design
        }
        // Index 15 must be mimalloc's purge delay, whose default is 1000 ms
        // (no neighbouring option defaults to that).
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            before, 1000,
            "option {MI_OPTION_PURGE_DELAY} is not purge_delay"
        );
        purge_freed_memory_at_once();
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, 0);
    }
}
