//! `regionsync verify --against CONNINFO`: whether this region's tables
//! hold the same rows as another region's (the comparison itself is
//! `crate::verify`). Exit 0 equal, 1 different, 2 could not compare.

use anyhow::Context as _;
use serde::Serialize;

use crate::apply::session;
use crate::config::{Config, PostgresConfig, Secret, SslMode};
use crate::ops::progress::Bars;
use crate::verify::{self, Options, Side, TableReport};

/// What the command found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Equal,
    Different,
}

/// The libpq keys `--against` takes. Keys not given are this region's
/// `[postgres]` values; the password comes from `PGPASSWORD`, never from
/// the command line.
const KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "application_name",
];

/// Parses a libpq key=value connection string (values may be single-quoted,
/// with `\'` and `\\` inside) over `base`.
pub fn parse_against(
    conninfo: &str,
    base: &PostgresConfig,
    pgpassword: Option<String>,
) -> Result<PostgresConfig, String> {
    let mut pg = base.clone();
    pg.password = pgpassword.map(Secret::new);
    pg.password_file = None;
    pg.pool_size = 2;
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.peek().copied() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "--against: {key:?} has no value (give key=value pairs, e.g. \"host=db.eu port=5432 dbname=app user=regionsync\")"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(format!(
                            "--against: the value of {key} lacks its closing quote"
                        ))
                    }
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        match key.as_str() {
            "password" | "passfile" => {
                return Err(format!(
                    "--against: {key} is not taken from the command line (it would show in the process list); set PGPASSWORD"
                ))
            }
            "host" => pg.host = value,
            "hostaddr" => pg.hostaddr = Some(value),
            "port" => {
                pg.port = value
                    .parse()
                    .map_err(|_| format!("--against: port {value:?} is not a port number"))?
            }
            "dbname" => pg.dbname = value,
            "user" => pg.user = value,
            "sslmode" => {
                pg.sslmode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("--against: sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
                }
            }
            "sslrootcert" => pg.sslrootcert = Some(value),
            "sslcert" => pg.sslcert = Some(value),
            "sslkey" => pg.sslkey = Some(value),
            "connect_timeout" | "application_name" => {}
            other => {
                return Err(format!(
                    "--against: unknown key {other:?} (known: {})",
                    KEYS.join(", ")
                ))
            }
        }
    }
    Ok(pg)
}

/// Connects one side through the apply pools' TLS connector, read-only.
async fn connect(config: &Config) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = session::plain_pool(config)?;
    let client = pool
        .get()
        .await
        .map_err(|e| anyhow::anyhow!(crate::apply::tls::explain_pool(&e, &config.postgres)))?;
    client
        .batch_execute(verify::SESSION_SQL)
        .await
        .context("setting up the read-only session")?;
    Ok(client)
}

#[derive(Serialize)]
struct JsonReport<'a> {
    equal: bool,
    here: &'a str,
    there: String,
    tables: &'a [TableReport],
}

/// The command: compares `tables` (default: every configured table) with
/// the database of `against`, prints the report (JSON with `json`).
pub async fn run(
    config: &Config,
    against: &str,
    tables: &[String],
    json: bool,
    max_differences: usize,
) -> anyhow::Result<Outcome> {
    let configured: Vec<(String, Vec<String>)> = config
        .tables
        .iter()
        .map(|t| {
            let (s, n) = t.target_parts();
            (format!("{s}.{n}"), t.key.clone())
        })
        .collect();
    let mut chosen = Vec::new();
    for t in tables {
        match configured.iter().find(|(name, _)| name == t) {
            Some(c) => chosen.push(c.clone()),
            None => anyhow::bail!(
                "--table {t}: not a table of the config (tables: {})",
                configured
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if chosen.is_empty() {
        chosen = configured;
    }
    let mut there_config = config.clone();
    there_config.postgres =
        parse_against(against, &config.postgres, std::env::var("PGPASSWORD").ok())
            .map_err(anyhow::Error::msg)?;
    let there_name = format!(
        "{}:{}/{}",
        there_config.postgres.host, there_config.postgres.port, there_config.postgres.dbname
    );
    let (h, t) = tokio::join!(connect(config), connect(&there_config));
    let here_client = h.context("here")?;
    let there_client = t.with_context(|| format!("there ({there_name})"))?;
    let here = Side {
        client: &here_client,
        label: &config.region,
    };
    let there = Side {
        client: &there_client,
        label: &there_name,
    };
    let options = Options {
        max_differences,
        heartbeat_topic: config.heartbeat_topic.clone(),
    };
    let bars = Bars::new();
    let mut reports = Vec::new();
    for (name, key) in &chosen {
        let (ch, ct) = tokio::join!(
            verify::columns(here.client, name),
            verify::columns(there.client, name)
        );
        let shape = verify::shape(name, key, ch?, &ct?).map_err(anyhow::Error::msg)?;
        let estimate: Option<f32> = here
            .client
            .query_opt(
                "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
                &[&shape.ident],
            )
            .await?
            .map(|r| r.get(0));
        let progress = bars.add(
            name,
            estimate.filter(|e| *e > 0.0).map(|e| e as u64),
            "rows",
        );
        let report =
            verify::compare_table(&here, &there, &shape, &options, &|n| progress.inc(n)).await?;
        progress.finish();
        reports.push(report);
    }
    let equal = reports.iter().all(TableReport::equal);
    if json {
        let out = JsonReport {
            equal,
            here: &config.region,
            there: there_name,
            tables: &reports,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render(&config.region, &there_name, &reports));
    }
    Ok(if equal {
        Outcome::Equal
    } else {
        Outcome::Different
    })
}

fn version(v: &Option<verify::Version>) -> String {
    v.as_ref().map_or("-".into(), |v| {
        format!("hlc {} origin {}", v.hlc, v.origin_region)
    })
}

/// The text report: per table a summary, then each differing key.
pub fn render(here: &str, there: &str, reports: &[TableReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "{}: {} rows here ({here}), {} there ({there}); {} keys differ; {} rechecked as possibly in flight, {} of them then equal",
            r.table,
            r.rows_here,
            r.rows_there,
            r.differences.len() as i64 + r.more_differences,
            r.rechecked,
            r.settled_on_recheck
        );
        for d in &r.differences {
            let _ = writeln!(
                out,
                "  {}\tkey {}\there: {}\tthere: {}",
                d.kind.as_str(),
                d.key,
                version(&d.here),
                version(&d.there)
            );
        }
        if r.more_differences > 0 {
            let _ = writeln!(
                out,
                "  … and {} more (--max-differences)",
                r.more_differences
            );
        }
    }
    let equal = reports.iter().all(TableReport::equal);
    let _ = writeln!(out, "{}", if equal { "equal" } else { "DIFFERENT" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PostgresConfig {
        crate::worker::test_config("").postgres
    }

    #[test]
    fn a_conninfo_overrides_the_local_settings() {
        let pg = parse_against(
            "host=db.eu port = 6543 dbname='my app' sslmode=verify-full sslrootcert=/ca.pem",
            &base(),
            Some("pw".into()),
        )
        .unwrap();
        assert_eq!(pg.host, "db.eu");
        assert_eq!(pg.port, 6543);
        assert_eq!(pg.dbname, "my app");
        assert_eq!(pg.user, "regionsync", "not given: this region's");
        assert_eq!(pg.sslmode, SslMode::VerifyFull);
        assert_eq!(pg.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(pg.password.as_ref().map(Secret::expose), Some("pw"));
    }

    #[test]
    fn a_password_on_the_command_line_is_refused() {
        let err = parse_against("host=x password=secret", &base(), None).unwrap_err();
        assert!(err.contains("PGPASSWORD"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = parse_against("host=x bogus=1", &base(), None).unwrap_err();
        assert!(err.contains("unknown key \"bogus\""), "{err}");
        let err = parse_against("host", &base(), None).unwrap_err();
        assert!(err.contains("has no value"), "{err}");
    }
}
