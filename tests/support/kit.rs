//! Helpers for pipeline tests: a table of the users shape in both regions,
//! worker configs for region B, in-process workers, and workload writers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regionsync::config::Config;
use tokio::sync::oneshot;

use super::*;

/// A table of the users shape in both regions.
pub struct TestTable {
    pub name: String,
}

impl TestTable {
    pub async fn create(prefix: &str) -> TestTable {
        let name = format!("{prefix}_{}", fresh_key());
        for region in [region_a(), region_b()] {
            let db = app_db(&region).await;
            db.batch_execute(&format!(
                "CREATE TABLE public.{name} (LIKE public.users INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);
                 ALTER TABLE public.{name} REPLICA IDENTITY FULL;
                 CREATE TRIGGER regionsync_stamp_hlc BEFORE INSERT OR UPDATE ON public.{name}
                     FOR EACH ROW EXECUTE FUNCTION regionsync.stamp_hlc('id');
                 CREATE TRIGGER regionsync_mark_deleted AFTER DELETE ON public.{name}
                     FOR EACH ROW EXECUTE FUNCTION regionsync.mark_deleted('id');
                 CREATE TRIGGER regionsync_mark_truncated AFTER TRUNCATE ON public.{name}
                     FOR EACH STATEMENT EXECUTE FUNCTION regionsync.mark_truncated();"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {name} in {}: {e}", region.name));
        }
        TestTable { name }
    }

    /// Every row of the table in `region`, as JSON text, ordered by id.
    /// Debezium carries an unconstrained `numeric` as a value and a scale
    /// without its trailing zeros (12.50 arrives as 12.5), so that column is
    /// compared by value.
    pub async fn rows(&self, region: &Region) -> Vec<String> {
        app_db(region)
            .await
            .query(
                &format!(
                    "SELECT (to_jsonb(t) || jsonb_build_object('lifetime', trim_scale(t.lifetime)))::text
                     FROM public.{} t ORDER BY id",
                    self.name
                ),
                &[],
            )
            .await
            .expect("select rows")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Waits until B's rows equal A's (full contents), or fails with the
    /// first difference.
    pub async fn wait_converged(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let (a, b) = (self.rows(&region_a()).await, self.rows(&region_b()).await);
            if a == b {
                return a.len();
            }
            if Instant::now() > deadline {
                let only_a: Vec<&String> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
                let only_b: Vec<&String> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
                panic!(
                    "{}: B did not converge to A in {timeout:?}: {} rows in A, {} in B;\nonly in A: {only_a:#?}\nonly in B: {only_b:#?}",
                    self.name,
                    a.len(),
                    b.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A worker for region B that consumes `topics` (source topic names) into
/// the test's table.
pub fn worker_config(table: &TestTable, topic: &str) -> Config {
    worker_config_with(table, topic, "")
}

pub fn worker_config_with(table: &TestTable, topic: &str, apply_extra: &str) -> Config {
    Config::from_toml(&worker_toml(table, topic, apply_extra)).expect("valid test config")
}

/// The TOML of a region-B worker for the test's table (`apply_extra` goes
/// into the `[apply]` section).
pub fn worker_toml(table: &TestTable, topic: &str, apply_extra: &str) -> String {
    let b = region_b();
    let toml = format!(
        r#"
        region = "{b}"
        regions = ["{a}", "{b}"]
        consumer_group = "test-{name}"
        dlq_topic = "regionsync.dlq.test-{name}"
        [kafka]
        bootstrap_servers = "{kafka}"
        [schema_registry]
        url = "{registry}"
        [postgres]
        host = "{host}"
        port = {port}
        dbname = "app"
        user = "regionsync"
        password = "{password}"
        [apply]
        linger_ms = 20
        {apply_extra}
        [[tables]]
        topics = ["{topic}"]
        target = "public.{name}"
        key = ["id"]
        "#,
        a = region_a().name,
        b = b.name,
        name = table.name,
        kafka = b.kafka,
        registry = registry_ccompat_url(),
        host = stack_env::HOST,
        port = b.pg_port,
        password = stack_env::REGIONSYNC_PASSWORD.get(),
    );
    toml
}

/// A worker for `region` that consumes the other region's topic of the
/// test's table; `table_extra` goes into the `[[tables]]` entry.
pub fn worker_toml_for(region: &Region, table: &TestTable, table_extra: &str) -> String {
    let topic = format!("cdc.public.{}", table.name);
    let b = region_b();
    worker_toml(table, &topic, "")
        .replace(
            &format!("region = \"{}\"", b.name),
            &format!("region = \"{}\"", region.name),
        )
        .replace(&b.kafka, &region.kafka)
        .replace(
            &format!("port = {}", b.pg_port),
            &format!("port = {}", region.pg_port),
        )
        .replace(
            "consumer_group = \"test-",
            &format!("consumer_group = \"test-{}-", region.name),
        )
        .replace("key = [\"id\"]", &format!("key = [\"id\"]\n{table_extra}"))
}

/// Runs a worker in the background; dropping the handle's sender stops it.
pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub fn start(config: Config) -> Worker {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(regionsync::run(
            config,
            async move {
                let _ = stopped.await;
            },
            false,
        ));
        Worker {
            stop: Some(stop),
            task,
        }
    }

    /// Waits (up to `within`) for the worker to end by itself, and gives
    /// its result (it is not told to stop).
    pub async fn ended(mut self, within: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(within, &mut self.task)
            .await
            .expect("the worker ended by itself in time")
            .expect("the worker task did not panic")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("the worker stops within 15 s")
            .expect("the worker task did not panic");
        result.expect("the worker ended without an error");
    }
}

/// A deterministic pseudo-random sequence (xorshift), so failures replay.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `n` mixed inserts, updates and deletes over `keys` keys in A, in
/// transactions of 50, touching every column type.
pub async fn write_mixed(table: &TestTable, n: usize, keys: u64, seed: u64) {
    let db = app_db(&region_a()).await;
    let mut rng = Rng(seed | 1);
    let name = &table.name;
    let mut sql = String::new();
    for i in 0..n {
        let id = rng.below(keys) as i64 + 1;
        let r = rng.next();
        let stmt = match rng.below(10) {
            0..=1 => format!("DELETE FROM {name} WHERE id = {id};"),
            2..=4 => format!(
                "INSERT INTO {name} (id, email, display_name, status, age, balance, lifetime, score, verified,
                                     external_id, profile, tags, avatar, bio, birth_date, last_login, created_at, home_region)
                 VALUES ({id}, 'u{id}@example.com', 'name {r}', '{status}', {age}, {bal}.{cents:02}, {r}.{r2},
                         {score}, {verified}, md5('{r}')::uuid, '{{\"n\": {r}, \"s\": \"q\\\"uote\"}}',
                         ARRAY['a{r}', NULL, 'b,c'], decode(md5('{r}'), 'hex'), repeat('bio {r} ', {bio_len}),
                         date '1969-12-01' + {days}, timestamp '2020-01-01 00:00:00.123456' + interval '{r2} seconds',
                         timestamptz '2021-06-01 12:00:00+02' + interval '{r2} microseconds', 'us-east-1')
                 ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, age = EXCLUDED.age;",
                status = ["active", "suspended", "closed"][(r % 3) as usize],
                age = r % 100,
                bal = (r % 1_000_000) as i64 - 500_000,
                cents = r % 100,
                r2 = r % 99_991,
                score = (r % 10_000) as f64 / 7.0,
                verified = r.is_multiple_of(2),
                bio_len = if r.is_multiple_of(5) { 1_000 } else { 2 },
                days = r % 20_000,
            ),
            _ => format!(
                "UPDATE {name} SET age = coalesce(age, 0) + 1, display_name = NULL, tags = tags || 'x{i}'::text,
                                   balance = balance * -1, verified = NOT coalesce(verified, false) WHERE id = {id};"
            ),
        };
        sql.push_str(&stmt);
        if (i + 1).is_multiple_of(50) || i + 1 == n {
            db.batch_execute(&format!("BEGIN; {sql} COMMIT;"))
                .await
                .expect("write batch in A");
            sql.clear();
        }
    }
}

/// Writes `n` fresh users (ids from `first`) in A.
pub async fn insert_users(table: &TestTable, first: i64, n: i64) {
    app_db(&region_a())
        .await
        .execute(
            &format!(
                "INSERT INTO {} (id, email) SELECT g, 'g' || g || '@example.com' FROM generate_series($1::bigint, $2::bigint) g",
                table.name
            ),
            &[&first, &(first + n - 1)],
        )
        .await
        .expect("insert users in A");
}

/// Starts `regionsync run` with `toml`; its log lines are collected.
pub fn spawn_worker(toml: &str, name: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regionsync"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .env("RUST_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start regionsync");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    (child, lines)
}

/// `regionsync setup` with `config` (an owner's), asserting it reports no
/// problem in `region`.
pub async fn setup_clean(config: &Config, region: &str) {
    let report = regionsync::ops::setup::setup(config)
        .await
        .expect("regionsync setup");
    assert!(
        report.problems.is_empty(),
        "setup in {region}: {:?}",
        report.problems
    );
}

/// Writes `toml` as a config file named `name` (target/test-configs/).
pub fn config_file(name: &str, toml: &str) -> PathBuf {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    path
}

/// Runs the regionsync binary with `config` and `args` to its end.
pub fn regionsync(config: &Path, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_regionsync"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run regionsync")
    })
}

/// A command's exit code and output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
