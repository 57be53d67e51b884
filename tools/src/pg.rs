//! Connections to the stack's PostgreSQL (loopback, database `app`) and the
//! checksum every benchmark run is verified by.

use tokio_postgres::{Client, NoTls};

use crate::stack::HOST;

pub async fn connect(port: u16, user: &str, password: &str) -> Client {
    let mut conn_str = format!("host={HOST} port={port} dbname=app user={user}");
    if !password.is_empty() {
        conn_str.push_str(&format!(" password={password}"));
    }
    let (client, conn) = tokio_postgres::connect(&conn_str, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {HOST}:{port} as {user}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// One pooled connection, as the worker's pool makes them: its statements
/// are prepared once and cached, like the worker's.
pub async fn connect_pooled(port: u16, user: &str) -> deadpool_postgres::Object {
    let mut config = tokio_postgres::Config::new();
    config.host(HOST).port(port).dbname("app").user(user);
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .build()
        .expect("a pool");
    pool.get()
        .await
        .unwrap_or_else(|e| panic!("connect to {HOST}:{port} as {user}: {e}"))
}

/// Row count and md5 of every row of `table` (schema-qualified), by id.
pub async fn checksum(client: &Client, table: &str) -> String {
    checksum_where(client, table, "").await
}

/// Row count and md5 of the rows of `table` that `filter` (a `WHERE …`
/// clause, or empty) keeps, by id.
pub async fn checksum_where(c: &Client, table: &str, filter: &str) -> String {
    c.query_one(
        &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY id)), '') FROM {table} t {filter}"),
        &[],
    )
    .await
    .expect("checksum")
    .get(0)
}
