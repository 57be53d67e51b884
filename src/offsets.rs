//! Offsets: the `regionsync.offsets` rows that say where each partition has
//! been applied up to; the source of truth on start and on every assignment.
//!
//! Not built yet: it arrives with the apply pipeline.
