//! Apply: batches of decoded changes written to PostgreSQL in bulk, under the
//! version guard of DESIGN.md §4, inside the caller's transaction (which also
//! stores the partition's offset, see `offsets`).
//!
//! What it promises:
//! - Several changes of one key in a batch collapse to the last one, so the
//!   batch's net effect per key is that of the last change (update → delete →
//!   update ends with the row present). The worker applies the versions
//!   before an update that keeps stored (unsent TOAST) columns first.
//! - An upsert lands only where its `(hlc, origin_region)` is newer than the
//!   stored row's and than the key's tombstone; a delete only removes an
//!   older row, and leaves a tombstone. Region names compare bytewise.
//! - One statement per table and kind per batch: every value is bound as a
//!   `text[]` array parameter and cast in SQL to the column's type, so the
//!   round trips do not grow with the batch. Each statement is prepared once
//!   per connection (the pool's statement cache, one entry per table and
//!   set of columns): a batch's statements are not parsed and analysed
//!   again, and take one round trip, not two. They are still planned on
//!   every execution (`session::APPLY_SESSION_SQL` says why).
//! - A truncate removes the rows older than its commit time (not newer ones),
//!   so replaying a topic never undoes later writes.
//!
//! | file | holds |
//! |---|---|
//! | `table` | a target table as the catalog describes it ([`TargetTable`]) |
//! | `prepare` | a change rendered for its table ([`Final`]), collapsed per key |
//! | `pg_text` | a value as PostgreSQL text input of its column's type |
//! | `write` | the guarded upsert, delete and truncate statements |
//! | `session` | the connection pools and the apply session's settings |
//! | `tls` | TLS to PostgreSQL (libpq's `sslmode`), and why a connection failed |
//! | `tombstones` | the collector of expired delete tombstones |

pub mod pg_text;
mod prepare;
pub mod session;
mod table;
pub mod tls;
pub mod tombstones;
mod write;

pub use prepare::{collapse, prepare, Final, PreparedDelete, PreparedRow, RowError};
pub use table::{quote_ident, Fit, TableError, TargetTable, UnknownColumn};
pub(crate) use write::guarded_insert_sql;
pub use write::{apply_finals, apply_truncate, refused_column, Applied};
