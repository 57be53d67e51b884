//! regionsync — the apply side of a multi-region PostgreSQL deployment.
//!
//! Debezium captures each region's changes into Kafka, MirrorMaker 2 copies
//! them to the other regions, and regionsync consumes them there and applies
//! them to the regional database, exactly once in effect, with
//! region-affinity routing and hybrid-logical-clock conflict checks, while
//! publishing the end-to-end replication lag. `../DESIGN.md` (shared) is the
//! contract; README.md says how to run it.
//!
//! # Layout
//! One module per step of an event's path through the worker:
//!
//! | module    | step                                                        |
//! |-----------|-------------------------------------------------------------|
//! | `config`  | the worker's configuration, validated before anything runs  |
//! | `source`  | the Kafka consumer of the mirrored CDC topics               |
//! | `decode`  | Debezium envelopes (JSON, Avro) into typed changes — pure   |
//! | `route`   | topic → table, a row's home region, classification — pure   |
//! | `clock`   | hybrid logical clocks and version order — pure              |
//! | `apply`   | batched, guarded writes to PostgreSQL                       |
//! | `offsets` | partition offsets stored with each batch                    |
//! | `metrics` | counters, histograms and the lag operators watch            |
//! | `ops`     | rebuild, verify, failover-check                             |
//!
//! The pipeline is being built step by step (see the project's issues); each
//! module's own documentation says what it owns today.

pub mod apply;
pub mod clock;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod offsets;
pub mod ops;
pub mod route;
pub mod source;
