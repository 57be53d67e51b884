//! The live demo: writes a steady mix of inserts, updates and deletes into
//! region A's PostgreSQL (as the application role `app`) and, once a second,
//! prints one line showing them arrive in region B through Debezium, Kafka,
//! MirrorMaker 2 and the regionsync worker of B.
//!
//! ```text
//! cargo run --release --example demo [-- --rate N] [--seconds S]
//! ```
//!
//! It needs the local stack and the workers (`make stack-up workers-up`, or
//! just `make demo`). Rows are written only in the demo id range (ids from
//! 1 000 000 000 upward), so the tests' rows are never touched. Ctrl-C stops
//! the writes; the demo then waits up to 15 s for B to catch up, prints a
//! summary and exits 0 (a second Ctrl-C skips the wait).
//!
//! Addresses follow deploy/local/env.sh: PG_PORT_A, PG_PORT_B,
//! WORKER_METRICS_PORT_B, REGION_A and APP_PASSWORD from the environment,
//! else the stack's defaults.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, NoTls};

/// The first id of the demo range, in both tables.
const DEMO_ID_BASE: i64 = 1_000_000_000;
/// The populations the writer keeps around (inserts win below them, deletes
/// above them).
const TARGET_USERS: usize = 1_000;
const TARGET_ORDERS: usize = 2_000;
/// How often the demo range is compared between A and B.
const DIFF_EVERY: Duration = Duration::from_secs(5);
/// How long to wait for B to catch up after Ctrl-C.
const DRAIN: Duration = Duration::from_secs(15);

struct Args {
    rate: f64,
    seconds: Option<f64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: demo [--rate OPS_PER_SECOND (default 50)] [--seconds S (default: until Ctrl-C)]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        rate: 50.0,
        seconds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || -> f64 {
            let v = inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage());
            match v.parse::<f64>() {
                Ok(n) if n > 0.0 && n.is_finite() => n,
                _ => {
                    eprintln!("demo: {flag} needs a positive number, not {v:?}");
                    usage()
                }
            }
        };
        match flag.as_str() {
            "--rate" => args.rate = value(),
            "--seconds" => args.seconds = Some(value()),
            "-h" | "--help" => {
                eprintln!("Writes a steady mix of changes into region A and shows them applied in region B.");
                usage()
            }
            _ => {
                eprintln!("demo: unknown argument {a:?}");
                usage()
            }
        }
    }
    args
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A small xorshift generator: the demo needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Rng(nanos | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn connect(port: &str, password: &str, region: &str) -> Result<Client, String> {
    let conn = format!(
        "host=127.0.0.1 port={port} dbname=app user=app password={password} application_name=regionsync-demo connect_timeout=5"
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.map_err(|e| {
        format!("connecting to PostgreSQL {region} (127.0.0.1:{port}) as app: {e}; is the stack up (make stack-up)?")
    })?;
    let region = region.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("\ndemo: PostgreSQL connection to {region}: {e}");
        }
    });
    Ok(client)
}

/// The ids of the demo range present in `table`.
async fn demo_ids(client: &Client, table: &str) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!("SELECT id FROM public.{table} WHERE id >= $1"),
            &[&DEMO_ID_BASE],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// One table's live demo ids and the next fresh one.
struct Population {
    ids: Vec<i64>,
    next_id: i64,
    target: usize,
}

impl Population {
    fn new(ids: Vec<i64>, target: usize) -> Population {
        let next_id = ids.iter().copied().max().map_or(DEMO_ID_BASE, |m| m + 1);
        Population {
            ids,
            next_id,
            target,
        }
    }
    /// 0 = insert, 1 = update, 2 = delete.
    fn pick(&self, rng: &mut Rng) -> u8 {
        if self.ids.is_empty() {
            return 0;
        }
        let r = rng.unit();
        let (insert, update) = if self.ids.len() < self.target {
            (0.6, 0.9)
        } else {
            (0.2, 0.7)
        };
        if r < insert {
            0
        } else if r < update {
            1
        } else {
            2
        }
    }
}

const STATUSES: [&str; 3] = ["active", "suspended", "closed"];
const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];

/// One write into A: an insert, update or delete of a user or an order.
async fn write_one(
    client: &Client,
    rng: &mut Rng,
    users: &mut Population,
    orders: &mut Population,
) -> Result<(), tokio_postgres::Error> {
    if rng.unit() < 0.4 {
        match users.pick(rng) {
            0 => {
                let id = users.next_id;
                let n = id - DEMO_ID_BASE;
                let tags = vec!["demo".to_string(), format!("batch-{}", n % 10)];
                let plan = ["free", "pro", "team"][rng.below(3)];
                let profile = serde_json::json!({"plan": plan, "n": n});
                client
                    .execute(
                        "INSERT INTO public.users (id, email, display_name, status, age, balance, score, verified, external_id, profile, tags) \
                         VALUES ($1, $2, $3, $4::text::public.user_status, $5, $6::text::numeric, $7, $8, $9, $10, $11)",
                        &[
                            &id,
                            &format!("demo{n}@example.com"),
                            &format!("Demo user {n}"),
                            &STATUSES[rng.below(3)],
                            &(18 + rng.below(60) as i32),
                            &format!("{}.{:02}", rng.below(100_000), rng.below(100)),
                            &(rng.unit() * 100.0),
                            &(rng.below(2) == 0),
                            &uuid::Uuid::new_v4(),
                            &profile,
                            &tags,
                        ],
                    )
                    .await?;
                users.next_id += 1;
                users.ids.push(id);
            }
            1 => {
                let id = users.ids[rng.below(users.ids.len())];
                client
                    .execute(
                        "UPDATE public.users SET balance = balance + $2::text::numeric, status = $3::text::public.user_status, \
                         score = $4, last_login = localtimestamp WHERE id = $1",
                        &[
                            &id,
                            &format!("{}.{:02}", rng.below(500), rng.below(100)),
                            &STATUSES[rng.below(3)],
                            &(rng.unit() * 100.0),
                        ],
                    )
                    .await?;
            }
            _ => {
                let i = rng.below(users.ids.len());
                let id = users.ids.swap_remove(i);
                client
                    .execute("DELETE FROM public.users WHERE id = $1", &[&id])
                    .await?;
            }
        }
    } else {
        match orders.pick(rng) {
            0 => {
                let id = orders.next_id;
                let user_id = if users.ids.is_empty() {
                    DEMO_ID_BASE
                } else {
                    users.ids[rng.below(users.ids.len())]
                };
                client
                    .execute(
                        "INSERT INTO public.orders (id, user_id, quantity, amount, currency, note) \
                         VALUES ($1, $2, $3, $4::text::numeric, $5, $6)",
                        &[
                            &id,
                            &user_id,
                            &(1 + rng.below(9) as i32),
                            &format!("{}.{:02}", rng.below(1_000), rng.below(100)),
                            &CURRENCIES[rng.below(CURRENCIES.len())],
                            &format!("demo order {}", id - DEMO_ID_BASE),
                        ],
                    )
                    .await?;
                orders.next_id += 1;
                orders.ids.push(id);
            }
            1 => {
                let id = orders.ids[rng.below(orders.ids.len())];
                client
                    .execute(
                        "UPDATE public.orders SET quantity = $2, note = $3 WHERE id = $1",
                        &[
                            &id,
                            &(1 + rng.below(9) as i32),
                            &format!("updated at {}", rng.next() % 1_000_000),
                        ],
                    )
                    .await?;
            }
            _ => {
                let i = rng.below(orders.ids.len());
                let id = orders.ids.swap_remove(i);
                client
                    .execute("DELETE FROM public.orders WHERE id = $1", &[&id])
                    .await?;
            }
        }
    }
    Ok(())
}

/// Writes at `rate` operations per second until `stop` is set.
async fn writer(
    client: Client,
    rate: f64,
    writes: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut users = Population::new(
        demo_ids(&client, "users")
            .await
            .map_err(|e| format!("reading demo users: {e}"))?,
        TARGET_USERS,
    );
    let mut orders = Population::new(
        demo_ids(&client, "orders")
            .await
            .map_err(|e| format!("reading demo orders: {e}"))?,
        TARGET_ORDERS,
    );
    let mut rng = Rng::seeded();
    let started = Instant::now();
    let mut done: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // Catch up to the schedule, but never by more than a second's worth.
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        let behind = due.saturating_sub(done);
        if behind as f64 > rate {
            done = due - rate as u64;
        }
        while done < due && !stop.load(Ordering::Relaxed) {
            done += 1;
            match write_one(&client, &mut rng, &mut users, &mut orders).await {
                Ok(()) => {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    if client.is_closed() {
                        return Err(format!("PostgreSQL A went away: {e}"));
                    }
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("\ndemo: a write failed (counted, continuing): {e}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// What the demo reads from B's worker.
#[derive(Clone, Copy, Default)]
struct Scrape {
    applied: f64,
    /// The worker's own `regionsync_replication_lag_seconds`.
    lag: Option<f64>,
}

/// The two numbers the demo shows, from the worker's exposition.
fn parse_metrics(text: &str, source_region: &str) -> Scrape {
    let picture = regionsync::ops::status::parse(text).unwrap_or_default();
    let applied = picture.regions.values().map(|r| r.applied).sum();
    let lag = picture
        .regions
        .get(source_region)
        .and_then(|r| r.lag_seconds);
    Scrape { applied, lag }
}

async fn scrape(http: &reqwest::Client, url: &str, source_region: &str) -> Result<Scrape, String> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(parse_metrics(&text, source_region))
}

/// Rows of the demo range that differ between A and B (missing on one side
/// or with different content), over both tables.
async fn diff(a: &Client, b: &Client) -> Result<usize, tokio_postgres::Error> {
    let mut differing = 0;
    for table in ["users", "orders"] {
        let sql = format!("SELECT id, md5(t::text) FROM public.{table} t WHERE id >= $1");
        let (ra, rb) = tokio::join!(
            a.query(&sql, &[&DEMO_ID_BASE]),
            b.query(&sql, &[&DEMO_ID_BASE])
        );
        let mut in_a: HashMap<i64, String> = ra?.iter().map(|r| (r.get(0), r.get(1))).collect();
        for r in rb? {
            let id: i64 = r.get(0);
            match in_a.remove(&id) {
                Some(h) if h == r.get::<_, String>(1) => {}
                _ => differing += 1,
            }
        }
        differing += in_a.len();
    }
    Ok(differing)
}

fn fmt_lag(lag: Option<f64>) -> String {
    lag.map_or("-".to_string(), |l| format!("{l:.1}s"))
}

fn fmt_diff(d: Option<usize>) -> String {
    d.map_or("-".to_string(), |n| n.to_string())
}

fn show(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\r{line}\x1b[K");
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    if let Err(e) = demo(parse_args()).await {
        eprintln!("\ndemo: {e}");
        std::process::exit(1);
    }
}

async fn demo(args: Args) -> Result<(), String> {
    let region_a = env_or("REGION_A", "us-east-1");
    let region_b = env_or("REGION_B", "eu-west-1");
    let password = env_or("APP_PASSWORD", "app-local");
    let port_a = env_or("PG_PORT_A", "15432");
    let port_b = env_or("PG_PORT_B", "25432");
    let metrics_url = format!(
        "http://127.0.0.1:{}/metrics",
        env_or("WORKER_METRICS_PORT_B", "29464")
    );

    let writer_client = connect(&port_a, &password, &region_a).await?;
    let check_a = connect(&port_a, &password, &region_a).await?;
    let check_b = connect(&port_b, &password, &region_b).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .map_err(|e| e.to_string())?;
    let first = scrape(&http, &metrics_url, &region_a).await.map_err(|e| {
        format!("the worker of {region_b} does not answer ({e}); start it with `make workers-up`")
    })?;

    println!(
        "demo: writing {} ops/s (users and orders, ids >= {DEMO_ID_BASE}) into {region_a} (127.0.0.1:{port_a}); \
         watching {region_b}'s worker at {metrics_url}. Ctrl-C to stop.",
        args.rate
    );
    println!(
        "      'applied' = regionsync_events_total{{outcome=\"applied\"}} in {region_b} (all sources, since the worker started); \
         lag = the worker's regionsync_replication_lag_seconds for {region_a}; diff = demo rows differing A vs B (checked every {}s)",
        DIFF_EVERY.as_secs()
    );

    let writes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer_task = tokio::spawn(writer(
        writer_client,
        args.rate,
        writes.clone(),
        errors.clone(),
        stop.clone(),
    ));

    let started = Instant::now();
    let mut prev = first;
    let mut prev_at = Instant::now();
    let mut last = first;
    let mut last_diff: Option<usize> = None;
    let mut last_diff_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut writer_done = false;

    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tick.tick() => {}
            r = &mut writer_task, if !writer_done => {
                writer_done = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(format!("the writer failed: {e}")),
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let now = Instant::now();
        let scraped = scrape(&http, &metrics_url, &region_a).await;
        let rate_line = match scraped {
            Ok(s) => {
                let dt = now.duration_since(prev_at).as_secs_f64().max(0.001);
                let per_s = (s.applied - prev.applied).max(0.0) / dt;
                prev = s;
                prev_at = now;
                last = s;
                format!(
                    "applied in {region_b}: {:>8} ({per_s:>5.0}/s) | lag {:>6}",
                    s.applied as u64,
                    fmt_lag(s.lag)
                )
            }
            Err(_) => format!("applied in {region_b}: worker not answering"),
        };
        if last_diff_at.is_none_or(|t| t.elapsed() >= DIFF_EVERY) {
            last_diff = diff(&check_a, &check_b).await.ok();
            last_diff_at = Some(Instant::now());
        }
        show(&format!(
            "[{:>5.0}s] writes in {region_a}: {:>7} | {rate_line} | diff {}",
            started.elapsed().as_secs_f64(),
            writes.load(Ordering::Relaxed),
            fmt_diff(last_diff)
        ));
    }

    // Stop writing, then give B a moment to catch up.
    stop.store(true, Ordering::Relaxed);
    if !writer_done {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), &mut writer_task).await
        {
            eprintln!("\ndemo: {e}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total_writes = writes.load(Ordering::Relaxed);
    println!();
    let drain_start = Instant::now();
    let mut skip = false;
    let mut final_diff = None;
    while drain_start.elapsed() < DRAIN && !skip {
        final_diff = diff(&check_a, &check_b).await.ok();
        if let Ok(s) = scrape(&http, &metrics_url, &region_a).await {
            last = s;
        }
        if final_diff == Some(0) {
            break;
        }
        show(&format!(
            "stopped writing; waiting for {region_b} to catch up ({:.0}s, Ctrl-C to skip): {} demo rows differ, lag {}",
            drain_start.elapsed().as_secs_f64(),
            fmt_diff(final_diff),
            fmt_lag(last.lag)
        ));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => skip = true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let converged = match final_diff {
        Some(0) => format!(
            "A and B agree on every demo row (after {:.1}s)",
            drain_start.elapsed().as_secs_f64()
        ),
        Some(n) => format!("{n} demo rows still differ between A and B"),
        None => "could not compare A and B".to_string(),
    };
    let errs = errors.load(Ordering::Relaxed);
    show(&format!(
        "demo: {elapsed:.1}s, {total_writes} writes in {region_a} ({:.1}/s{}), {} events applied in {region_b} during the demo \
         ({} since the worker started), last lag {}; {converged}",
        total_writes as f64 / elapsed.max(0.001),
        if errs > 0 { format!(", {errs} failed") } else { String::new() },
        (last.applied - first.applied).max(0.0) as u64,
        last.applied as u64,
        fmt_lag(last.lag),
    ));
    println!();
    Ok(())
}
