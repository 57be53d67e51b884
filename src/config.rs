//! Config: the worker's TOML configuration with environment overrides,
//! validated (every bad field named) before anything is consumed.
//!
//! Not built yet: it arrives with the apply pipeline.
