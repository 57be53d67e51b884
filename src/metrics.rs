//! Metrics: every metric's name and labels in one place, served for
//! Prometheus with `/metrics`, `/healthz` and `/readyz` (DESIGN.md §5).
//!
//! Not built yet: it arrives with the lag metrics.
