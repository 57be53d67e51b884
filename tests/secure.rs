//! The worker on secured infrastructure, against the local stack's secured
//! endpoints (deploy/local/stack.sh): Kafka B's SASL_SSL listener (SCRAM-
//! SHA-512, user `regionsync`) and PostgreSQL B's TLS, both with
//! certificates of the stack's CA (target/stack/tls/ca.pem).
//!
//! - A worker over SASL_SSL and `verify-full` replicates, and its dead
//!   letters go out over the same connection.
//! - Each refusal stops start-up with its own error and applies nothing: a
//!   wrong SCRAM password, a CA that did not sign the server's certificate
//!   (PostgreSQL and Kafka), a host name not in the certificate, a
//!   client-certificate role without a certificate. `verify-ca` accepts what
//!   `verify-full` refuses for its name, and the client certificate logs in.
//! - The password never shows in the worker's log or /metrics, neither after
//!   a refused start nor after a normal run.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use regionsync::config::Config;
use support::kit::*;
use support::*;

fn tls_dir() -> PathBuf {
    stack_dir().join("tls")
}

fn ca() -> String {
    tls_dir().join("ca.pem").display().to_string()
}

fn sasl_bootstrap() -> String {
    format!("{}:{}", stack_env::HOST, stack_env::KAFKA_SASL_PORT_B.get())
}

/// A file under target/test-configs holding `content` (a password file).
fn file_with(name: &str, content: &str) -> String {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write file");
    path.display().to_string()
}

/// A CA of its own, which signed none of the stack's certificates.
fn other_ca() -> String {
    let dir = repo_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let cert = dir.join("secure-other-ca.pem");
    if !cert.exists() {
        let key = dir.join(format!("secure-other-ca-key-{}.pem", fresh_key()));
        let tmp = dir.join(format!("secure-other-ca-{}.pem", fresh_key()));
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            ])
            .args(["-subj", "/CN=not the stack's CA", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&tmp)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl made no CA");
        std::fs::rename(&tmp, &cert).expect("rename CA");
        let _ = std::fs::remove_file(key);
    }
    cert.display().to_string()
}

/// The TOML of a region-B worker for `table` over SASL_SSL and TLS to
/// PostgreSQL; `kafka` and `postgres` are the keys of those sections.
fn secure_toml(table: &TestTable, kafka: &str, postgres: &str) -> String {
    let b = region_b();
    let topic = format!("cdc.public.{}", table.name);
    format!(
        r#"
        region = "{b}"
        regions = ["{a}", "{b}"]
        consumer_group = "test-{name}"
        dlq_topic = "regionsync.dlq.test-{name}"
        [kafka]
        bootstrap_servers = "{sasl}"
        {kafka}
        [postgres]
        port = {port}
        dbname = "app"
        {postgres}
        [apply]
        linger_ms = 20
        max_message_bytes = 65536
        [[tables]]
        topics = ["{topic}"]
        target = "public.{name}"
        key = ["id"]
        "#,
        a = region_a().name,
        b = b.name,
        name = table.name,
        sasl = sasl_bootstrap(),
        port = b.pg_port,
    )
}

/// SASL_SSL with SCRAM-SHA-512 as the stack's user, the password in a file.
fn good_kafka(table: &TestTable) -> String {
    let file = file_with(
        &format!("secure-{}.sasl", table.name),
        &format!("{}\n", stack_env::REGIONSYNC_PASSWORD.get()),
    );
    format!(
        r#"security_protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "regionsync"
        sasl_password_file = "{file}"
        ssl_ca_location = "{ca}""#,
        ca = ca()
    )
}

/// verify-full as `regionsync` against the name `localhost`.
fn good_postgres() -> String {
    format!(
        r#"host = "localhost"
        user = "regionsync"
        password = "{password}"
        sslmode = "verify-full"
        sslrootcert = "{ca}""#,
        password = stack_env::REGIONSYNC_PASSWORD.get(),
        ca = ca()
    )
}

fn config(toml: &str) -> Config {
    Config::from_toml(toml).unwrap_or_else(|e| panic!("valid test config: {e}\n{toml}"))
}

/// Runs a worker that must be refused; returns its error once start-up
/// gives up.
async fn refused(config: Config) -> String {
    let run = regionsync::run(config, std::future::pending(), false);
    match tokio::time::timeout(Duration::from_secs(120), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(())) => panic!("the worker ended without an error"),
        Err(_) => panic!("start-up did not give up within 120 s"),
    }
}

/// Rows of the test's table in B.
async fn rows_in_b(table: &TestTable) -> i64 {
    app_db(&region_b())
        .await
        .query_one(&format!("SELECT count(*) FROM public.{}", table.name), &[])
        .await
        .expect("count rows in B")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_over_sasl_ssl_and_verify_full_replicates_and_dead_letters() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let table = TestTable::create("secure").await;
    let worker = Worker::start(config(&secure_toml(
        &table,
        &good_kafka(&table),
        &good_postgres(),
    )));
    insert_users(&table, 1, 300).await;
    assert_eq!(table.wait_converged(Duration::from_secs(120)).await, 300);

    // The worker's sessions are encrypted.
    let tls_sessions: i64 = admin_db(&region_b())
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE usename = 'regionsync' AND application_name = 'regionsync' AND ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(tls_sessions >= 1, "no TLS session of the worker");

    // A poison message goes to the dead-letter topic, produced over the
    // worker's SASL_SSL connection (its only one to Kafka B).
    let topic = mirrored(&region_a(), &format!("cdc.public.{}", table.name));
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &region_b().kafka)
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<'_, [u8], [u8]>::to(&topic)
                .key(br#"{"id": 900001}"#)
                .payload(b"not json, over SASL_SSL"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("produce poison: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let dlq = format!("regionsync.dlq.test-{}", table.name);
    let letters = TopicReader::open(&region_b(), &dlq, deadline).collect(
        deadline,
        |m| {
            use rdkafka::message::Message;
            m.payload() == Some(b"not json, over SASL_SSL".as_slice())
        },
        |found| !found.is_empty(),
    );
    assert_eq!(letters.len(), 1, "the poison message was dead-lettered");
    insert_users(&table, 301, 10).await;
    assert_eq!(table.wait_converged(Duration::from_secs(60)).await, 310);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_cas_wrong_names_and_missing_client_certificates_are_named() {
    let table = TestTable::create("secure_refused").await;
    insert_users(&table, 1, 20).await;
    let kafka = good_kafka(&table);
    let other = other_ca();
    let untrusted_pg = good_postgres().replace(&ca(), &other);
    let untrusted_kafka = kafka.replace(&ca(), &other);
    // Connects to 127.0.0.1 but expects the certificate to name a host it
    // does not name.
    let wrong_name = good_postgres().replace(
        r#"host = "localhost""#,
        r#"host = "db.example.test"
        hostaddr = "127.0.0.1""#,
    );
    let cert_role = format!(
        r#"host = "127.0.0.1"
        user = "regionsync_cert"
        sslmode = "verify-full"
        sslrootcert = "{ca}""#,
        ca = ca()
    );
    let (pg_ca, kafka_ca, name, no_cert) = tokio::join!(
        refused(config(&secure_toml(&table, &kafka, &untrusted_pg))),
        refused(config(&secure_toml(
            &table,
            &untrusted_kafka,
            &good_postgres()
        ))),
        refused(config(&secure_toml(&table, &kafka, &wrong_name))),
        refused(config(&secure_toml(&table, &kafka, &cert_role))),
    );
    assert!(
        pg_ca.contains("untrusted CA") && pg_ca.contains("PostgreSQL"),
        "{pg_ca}"
    );
    assert!(
        kafka_ca.contains("Kafka broker's certificate could not be verified"),
        "{kafka_ca}"
    );
    assert!(
        name.contains("host name mismatch") && name.contains("db.example.test"),
        "{name}"
    );
    assert!(
        no_cert.contains("requires a client certificate") && no_cert.contains("regionsync_cert"),
        "{no_cert}"
    );
    assert_eq!(rows_in_b(&table).await, 0, "nothing was applied");

    // What verify-full refused for its name, verify-ca accepts; the client
    // certificate role logs in with its certificate.
    let verify_ca = wrong_name.replace("verify-full", "verify-ca");
    let tls = tls_dir();
    let with_cert = format!(
        "{cert_role}\n        sslcert = \"{}\"\n        sslkey = \"{}\"",
        tls.join("client-regionsync_cert.pem").display(),
        tls.join("client-regionsync_cert-key.pem").display()
    );
    for postgres in [verify_ca, with_cert] {
        let c = config(&secure_toml(&table, &kafka, &postgres));
        let pool = regionsync::apply::session::pool(&c).expect("pool");
        regionsync::check_connections(&c, &pool)
            .await
            .unwrap_or_else(|e| panic!("refused: {e}\n{postgres}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_names_missing_files_halves_and_credentials_before_connecting() {
    let table = TestTable::create("secure_check").await;
    let bad_kafka = r#"security_protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        ssl_ca_location = "/nonexistent/ca.pem""#;
    let bad_postgres = r#"host = "localhost"
        user = "regionsync"
        sslmode = "verify-full"
        sslrootcert = "/nonexistent/root.pem"
        sslkey = "/nonexistent/client.key""#;
    let toml = secure_toml(&table, bad_kafka, bad_postgres);
    let path = file_with(&format!("secure-check-{}.toml", table.name), &toml);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regionsync"))
        .args(["--config", &path, "check-config"])
        .output()
        .expect("run check-config");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    for expected in [
        "kafka.ssl_ca_location: /nonexistent/ca.pem (the CA certificate) is not a readable file",
        "kafka.sasl_mechanism: SCRAM-SHA-512 needs credentials",
        "postgres.sslrootcert: /nonexistent/root.pem (the CA certificate) is not a readable file",
        "postgres.sslkey: a client key without a certificate",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// The worker's whole log and /metrics hold no password: after start-up
/// was refused for a wrong SCRAM password (while /readyz said why), and
/// after a normal run.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_scram_password_is_named_and_no_password_is_ever_printed() {
    let table = TestTable::create("secure_secrets").await;
    insert_users(&table, 1, 50).await;
    let wrong = format!("wrong-scram-{}", fresh_key());
    let right = stack_env::REGIONSYNC_PASSWORD.get();
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let metrics = format!("\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let with_metrics = |toml: String| {
        toml.replace("[apply]", &format!("{metrics}\n[apply]"))
            .replace("max_message_bytes = 65536", "")
    };
    // The passwords come from the environment and a file, as in production.
    let kafka = |password_file: &str| {
        format!(
            r#"security_protocol = "sasl_ssl"
            sasl_mechanism = "SCRAM-SHA-512"
            sasl_username = "regionsync"
            sasl_password_file = "{password_file}"
            ssl_ca_location = "{ca}""#,
            ca = ca()
        )
    };
    let postgres = good_postgres().replace(&format!("password = \"{right}\""), "");
    let wrong_file = file_with(&format!("secure-{}.wrong", table.name), &wrong);
    let right_file = file_with(&format!("secure-{}.right", table.name), &right);
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let url = format!("http://127.0.0.1:{metrics_port}{path}");
        let http = http.clone();
        async move {
            match http.get(&url).send().await {
                Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
                Err(_) => None,
            }
        }
    };

    // Refused: /readyz says why while start-up retries, then it stops.
    let toml = with_metrics(secure_toml(&table, &kafka(&wrong_file), &postgres));
    let (mut child, log) = spawn_worker_with_env(
        &toml,
        &format!("secure-wrong-{}", table.name),
        &[("REGIONSYNC_POSTGRES__PASSWORD", right.as_str())],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut readyz = None;
    while Instant::now() < deadline {
        if let Some((503, body)) = get("/readyz").await {
            if body.contains("SASL") {
                readyz = Some(body);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let readyz = readyz.expect("/readyz named the refused SASL credentials while retrying");
    assert!(
        readyz.contains("Kafka refused the SASL credentials"),
        "{readyz}"
    );
    let metrics_text = get("/metrics").await.map(|(_, t)| t).unwrap_or_default();
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait");
    assert!(!status.success(), "start-up must fail");
    let refused_log = log.lock().expect("log").join("\n");
    assert!(
        refused_log.contains("Kafka refused the SASL credentials"),
        "{refused_log}"
    );
    assert_eq!(rows_in_b(&table).await, 0, "nothing was applied");

    // A normal run.
    let toml = with_metrics(secure_toml(&table, &kafka(&right_file), &postgres));
    let (mut child, log) = spawn_worker_with_env(
        &toml,
        &format!("secure-right-{}", table.name),
        &[("REGIONSYNC_POSTGRES__PASSWORD", right.as_str())],
    );
    table.wait_converged(Duration::from_secs(120)).await;
    let mut normal_metrics = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !normal_metrics.contains("regionsync_changes_applied") {
        normal_metrics = get("/metrics").await.map(|(_, t)| t).unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        normal_metrics.contains("regionsync_"),
        "no metrics: {normal_metrics}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait");
    assert!(status.success(), "SIGTERM stops the worker cleanly");
    let normal_log = log.lock().expect("log").join("\n");
    assert!(!normal_log.is_empty());

    for (what, text) in [
        ("the refused worker's log", &refused_log),
        ("/metrics while refused", &metrics_text),
        ("/readyz while refused", &readyz),
        ("the normal worker's log", &normal_log),
        ("/metrics of the normal run", &normal_metrics),
    ] {
        for secret in [&wrong, &right] {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows a password:\n{text}"
            );
        }
    }
}

/// Starts `regionsync run` as [`spawn_worker`] does, with extra environment
/// variables and debug logging (the most a worker ever prints).
fn spawn_worker_with_env(
    toml: &str,
    name: &str,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let path = file_with(&format!("{name}.toml"), toml);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regionsync"));
    cmd.arg("--config")
        .arg(&path)
        .arg("run")
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start regionsync");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().expect("log lock").push(line);
        }
    });
    (child, lines)
}
