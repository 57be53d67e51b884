//! `make bench-decode`: the worker's own CPU per change, without Kafka or
//! PostgreSQL in the measurement. Reads the first M (default 100,000)
//! mirrored changes of `make bench`'s topics from Kafka B into memory, then
//! decodes each and prepares its row for the target table (what the worker
//! does between fetching a message and sending its batch), on one thread,
//! R times (default 5). Prints the median µs per change and changes/s per
//! core, per encoding. On a shared 2-core box the replay rates of `make
//! bench` move with everything else running; this figure does not, so it
//! is the one to compare decode changes by.
//!
//! Needs the topics `make bench` produced (run it first) and the stack up.
//!
//! cargo run --release -p regionsync-tools --bin bench-decode [-- --changes N --messages M --runs R --only json|avro]

use std::time::{Duration, Instant};

use rdkafka::message::Message;
use regionsync::apply::{self, TargetTable};
use regionsync::decode::registry::AvroSource;
use regionsync::decode::{self, Decoded};
use regionsync_tools::args::{arg, exit_if_help, only};
use regionsync_tools::copy::users_copy_target;
use regionsync_tools::kafka::{kafka_b_from_beginning, topic_ends};
use regionsync_tools::pg::connect;
use regionsync_tools::source::{source_table, source_topics};
use regionsync_tools::stack::{mirrored, pg_port_b, region_a, registry_ccompat_url};
use regionsync_tools::stats::median;

const USAGE: &str = "usage: bench-decode [--changes N (default 1000000)] [--messages M (default 100000)] [--runs R (default 5)] [--only json|avro]
The worker's decode + prepare CPU per change, from memory, on the first M changes of `make bench`'s topics (run it first).";

// The worker's allocator (src/main.rs): allocation is a fair share of decoding.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Raw = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The first `m` messages of `topic` on Kafka B, partition by partition.
fn first_messages(topic: &str, m: usize) -> Vec<Raw> {
    let ends = topic_ends(topic);
    let consumer = kafka_b_from_beginning(topic, ends.keys().copied());
    let available: i64 = ends.values().sum();
    let want = m.min(available as usize);
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(500)) {
            out.push((
                msg.key().map(<[u8]>::to_vec),
                msg.payload().map(<[u8]>::to_vec),
            ));
        }
    }
    out
}

/// Decodes and prepares every message once; returns the seconds taken and
/// how many were handled (a row prepared, or a tombstone).
async fn decode_all(
    messages: &[Raw],
    table: &TargetTable,
    avro: Option<&AvroSource>,
    source_region: &str,
) -> (f64, u64) {
    let started = Instant::now();
    let mut handled = 0;
    for (key, value) in messages {
        let decoded = match avro {
            None => decode::decode_json(key.as_deref(), value.as_deref()),
            Some(source) => {
                let key = source.decode(key.as_deref()).await.expect("avro key");
                let value = source
                    .decode_envelope(value.as_deref())
                    .await
                    .expect("avro value");
                let key = key.expect("a key");
                match value {
                    Some(v) => {
                        decode::decode_avro(key.value, &key.schema, Some((v.value, &*v.schema)))
                    }
                    None => decode::decode_avro(key.value, &key.schema, None),
                }
            }
        };
        match decoded {
            Ok(Decoded::Change(change)) => {
                if apply::prepare(table, change, source_region).is_ok() {
                    handled += 1;
                }
            }
            // Compaction's tombstone after each delete: decoded, skipped.
            Ok(Decoded::Tombstone { .. }) => handled += 1,
            Err(_) => {}
        }
    }
    (started.elapsed().as_secs_f64(), handled)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    exit_if_help(USAGE);
    let n = arg("--changes", 1_000_000);
    let m = arg("--messages", 100_000) as usize;
    let runs = arg("--runs", 5);
    let b = connect(pg_port_b(), "postgres", "").await;
    let table = users_copy_target(&b, "public.users").await;
    let registry = AvroSource::new(&registry_ccompat_url()).expect("a schema registry client");
    let source_region = region_a();
    // `--only json` or `--only avro` measures one encoding (for profiling).
    let only = only();
    let mut lines = Vec::new();
    for (enc, topic) in ["json", "avro"]
        .into_iter()
        .zip(source_topics(&source_table(n)))
        .filter(|(enc, _)| only.as_deref().is_none_or(|o| o == *enc))
    {
        let messages = first_messages(&mirrored(&topic), m);
        let avro = (enc == "avro").then_some(&registry);
        // One untimed pass: schemas fetched and cached, as in a running worker.
        let (_, handled) = decode_all(&messages, &table, avro, &source_region).await;
        assert_eq!(
            handled as usize,
            messages.len(),
            "{enc}: not every message became a row or a tombstone"
        );
        let mut per_change_us = Vec::new();
        for run in 0..runs {
            let (secs, _) = decode_all(&messages, &table, avro, &source_region).await;
            let us = secs * 1e6 / messages.len() as f64;
            println!("{enc} run {run}: {us:.2} µs per change");
            per_change_us.push(us);
        }
        let (lo, hi) = per_change_us
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let us = median(per_change_us);
        lines.push(format!(
            "{enc}: decode + prepare {us:.2} µs per change (median of {runs}; {lo:.2}–{hi:.2}) \
             = {:.0} changes/s per core, over the first {} changes",
            1e6 / us,
            messages.len()
        ));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
}
