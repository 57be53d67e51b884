//! Operations: `rebuild`, `verify` and `failover-check` (DESIGN.md §7).
//!
//! Not built yet.
