//! Apply: per partition, batches of changes written to PostgreSQL in one
//! transaction together with the partition's next offset (DESIGN.md §2), as
//! bulk array-parameter statements under `session_replication_role = replica`.
//!
//! Not built yet: the apply pipeline is the next step of the project.
