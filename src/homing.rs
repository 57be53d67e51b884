//! Failover homing as stored: the re-homing windows of
//! `regionsync.homing` (DESIGN.md §3, "Failover homing"). The worker reads
//! them inside each batch's transaction, so a batch committed after a
//! `regionsync rehome` committed here classifies its writes with it;
//! `regionsync route` reads them to answer with the current home; `rehome`
//! writes the same windows into every region it reaches. The rule itself
//! ([`crate::route::HomingOverrides`]) is pure.

use tokio_postgres::GenericClient;

use crate::route::{HomingOverrides, HomingWindow};

/// Every re-homing window stored in this database.
pub async fn load(client: &impl GenericClient) -> Result<HomingOverrides, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT region, acting_home, from_ms, until_ms, epoch FROM regionsync.homing
              ORDER BY region, from_ms",
            &[],
        )
        .await?;
    Ok(HomingOverrides {
        windows: rows
            .iter()
            .map(|r| HomingWindow {
                region: r.get(0),
                acting_home: r.get(1),
                from_ms: r.get(2),
                until_ms: r.get(3),
                epoch: r.get(4),
            })
            .collect(),
    })
}

/// Writes `windows` into this database: each window is inserted, or
/// replaces the stored one of the same (region, from_ms) when its epoch is
/// newer. Idempotent, and the result does not depend on the order in which
/// regions are written: every database ends with the newest epoch's rows.
pub async fn store(
    client: &mut tokio_postgres::Client,
    windows: &[HomingWindow],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    for w in windows {
        tx.execute(
            "INSERT INTO regionsync.homing AS h (region, acting_home, from_ms, until_ms, epoch)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (region, from_ms) DO UPDATE
                SET acting_home = EXCLUDED.acting_home, until_ms = EXCLUDED.until_ms,
                    epoch = EXCLUDED.epoch, changed_at = now()
              WHERE h.epoch < EXCLUDED.epoch",
            &[&w.region, &w.acting_home, &w.from_ms, &w.until_ms, &w.epoch],
        )
        .await?;
    }
    tx.commit().await
}
