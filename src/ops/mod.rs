//! Operations: the operator's commands besides `run`, one file each. They
//! connect through `apply::session` like the worker does.
//!
//! | file | command |
//! |---|---|
//! | `setup` | `regionsync setup`: schema, triggers, grants |
//! | `status` | `regionsync status`: one worker's picture from its metrics |
//! | `conflicts` | `regionsync conflicts list|resolve` |
//! | `dlq` | `regionsync dlq list|replay`: dead letters listed, and replayed once fixed |
//! | `route` | `regionsync route KEY`: a key's home region |
//! | `rehome` | `regionsync rehome`: a region's rows homed elsewhere, and back |
//! | `failover_check` | `regionsync failover-check`: may this region take over? |
//! | `verify` | `regionsync verify --against`: compare with another region |
//! | `rebuild` | `regionsync rebuild`: replay the topics into this region's tables |
//! | `progress` | progress bars (a terminal) or log lines for long commands |

pub mod conflicts;
pub mod dlq;
pub mod failover_check;
pub mod progress;
pub mod rebuild;
pub mod rehome;
pub mod route;
pub mod setup;
pub mod status;
pub mod verify;
