//! The demo's writer: a steady mix of inserts, updates and deletes of users
//! and orders in region A, as the application role, only in the demo id
//! range (from 1 000 000 000 upward), so the tests' rows are never touched.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::Client;

/// The first id of the demo range, in both tables.
pub const DEMO_ID_BASE: i64 = 1_000_000_000;
/// The populations the writer keeps around (inserts win below them, deletes
/// above them).
const TARGET_USERS: usize = 1_000;
const TARGET_ORDERS: usize = 2_000;

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

/// The ids of the demo range present in `table`.
pub async fn demo_ids(client: &Client, table: &str) -> Result<Vec<i64>, tokio_postgres::Error> {
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
pub async fn writer(
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
