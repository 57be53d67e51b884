//! Source: the rdkafka consumer of the mirrored CDC and heartbeat topics, one
//! consumer group per region, seeking to the offsets stored in PostgreSQL.
//!
//! Not built yet: it arrives with the apply pipeline.
