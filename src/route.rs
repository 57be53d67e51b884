//! Route: topic → target table, a row's home region (jump consistent hash of
//! xxh64), and the classification of each change (DESIGN.md §3). Pure.
//!
//! Not built yet: it arrives with active-active replication.
