//! The stack's own life cycle: `make stack-down` stops every process it
//! started, `make stack-up` brings an existing stack back with its data, and
//! removing target/stack (`STACK_DIR`) builds a new one. It restarts the
//! whole stack, so `make test` runs it last in its second lane
//! (tests/lane2.sh), on that lane's own stack.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use support::*;

const ARRIVAL: Duration = Duration::from_secs(60);

/// Every port a service of the stack listens on (deploy/local/env.sh: this
/// stack's, which need not be the defaults).
fn stack_ports() -> Vec<u16> {
    support::stack_env::SERVICE_PORTS
        .iter()
        .map(|v| v.port())
        .collect()
}

fn make(target: &str) {
    let status = tokio::task::block_in_place(|| {
        Command::new("make")
            .arg(target)
            .current_dir(repo_root())
            .status()
            .expect("run make")
    });
    assert!(status.success(), "make {target} failed: {status}");
}

fn recorded_pids() -> Vec<u32> {
    let dir = stack_dir().join("pids");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Stops the stack and checks that nothing it started is left.
fn stack_down_leaves_nothing() {
    let pids = recorded_pids();
    assert!(
        pids.len() >= 8,
        "a running stack records its pids: {pids:?}"
    );
    make("stack-down");
    for pid in pids {
        // Its state line (name, state, parent) says whether it still runs or
        // has exited and waits for its parent to reap it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        assert!(
            stat.is_err(),
            "process {pid} of the stack is still in the process table after stack-down: {}",
            stat.unwrap_or_default().trim()
        );
    }
    for port in stack_ports() {
        assert!(!port_open(port), "port {port} still open after stack-down");
    }
}

/// Writes a user in A and waits for its create event on B's Kafka.
async fn write_and_see_it_mirrored(note: &str) -> i64 {
    let (a, b) = (region_a(), region_b());
    let key = fresh_key();
    app_db(&a)
        .await
        .execute(
            "INSERT INTO users (id, email, display_name) VALUES ($1, $2, $3)",
            &[&key, &format!("u{key}@example.com"), &note],
        )
        .await
        .expect("insert");
    assert!(
        events_of(&b, "cdc.public.users", key, 1).await >= 1,
        "{note}: the create of id {key} did not reach {} within {ARRIVAL:?}",
        b.name
    );
    key
}

/// How many events of user `key` the mirrored `topic` holds at `region`
/// (reading up to `want`, or until the arrival bound passes).
async fn events_of(region: &Region, topic: &str, key: i64, want: usize) -> usize {
    let topic = mirrored(&region_a(), topic);
    let deadline = Instant::now() + ARRIVAL;
    tokio::task::block_in_place(|| {
        let reader = TopicReader::open(region, &topic, deadline);
        reader
            .collect(
                deadline,
                |m| {
                    json_payload(m.key())
                        .map(|k| k["id"] == key)
                        .unwrap_or(false)
                },
                |found| found.len() >= want,
            )
            .len()
    })
}

async fn user_exists(key: i64) -> bool {
    app_db(&region_a())
        .await
        .query_opt("SELECT 1 FROM users WHERE id = $1", &[&key])
        .await
        .expect("query")
        .is_some()
}

/// The Avro create of `key` still decodes: its schema id resolves. The Avro
/// connector runs apart from the JSON one, so its event may arrive later:
/// the topic is read again until the event is there or the bound passes.
async fn avro_event_decodes(key: i64) {
    let (a, b) = (region_a(), region_b());
    let topic = mirrored(&a, "cdc.avro.public.users");
    let decoder = AvroDecoder::new(SrSettings::new(registry_ccompat_url()));
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let reader = tokio::task::block_in_place(|| TopicReader::open(&b, &topic, deadline));
        let msgs = tokio::task::block_in_place(|| reader.read_all(deadline));
        for msg in msgs.iter().filter(|m| m.payload().is_some()) {
            let value = decoder
                .decode(msg.payload())
                .await
                .unwrap_or_else(|e| panic!("an Avro event on {topic} no longer decodes: {e}"));
            if format!("{:?}", value.value).contains(&format!("Long({key})")) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no Avro event of id {key} on {topic} within {ARRIVAL:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stack_restarts_with_its_data_and_rebuilds_from_nothing() {
    make("stack-up");
    let before_restart = write_and_see_it_mirrored("before restart").await;
    avro_event_decodes(before_restart).await;

    // Down and up again: the databases, topics and registry schemas are kept,
    // and replication resumes.
    stack_down_leaves_nothing();
    make("stack-up");
    make("stack-up"); // idempotent: a running stack is left alone
    assert!(
        user_exists(before_restart).await,
        "data kept across restart"
    );
    assert_eq!(
        events_of(&region_b(), "cdc.public.users", before_restart, 1).await,
        1,
        "B's Kafka keeps the mirrored events"
    );
    avro_event_decodes(before_restart).await;
    write_and_see_it_mirrored("after restart").await;

    // Down, remove the state, up: a brand-new stack that still replicates.
    stack_down_leaves_nothing();
    std::fs::remove_dir_all(stack_dir()).expect("rm -rf the stack's directory");
    make("stack-up");
    assert!(
        !user_exists(before_restart).await,
        "a rebuilt stack starts from empty databases"
    );
    write_and_see_it_mirrored("after rebuild").await;
}
