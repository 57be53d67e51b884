//! Operations: the operator's commands besides `run`, one file each. They
//! connect through `apply::session` like the worker does.
//!
//! | file | command |
//! |---|---|
//! | `setup` | `regionsync setup`: schema, triggers, grants |
//! | `status` | `regionsync status`: one worker's picture from its metrics |
//! | `conflicts` | `regionsync conflicts list|resolve` |
//! | `route` | `regionsync route KEY`: a key's home region |

pub mod conflicts;
pub mod route;
pub mod setup;
pub mod status;
