//! Decode: Debezium envelopes (JSON with or without schemas, Avro in the
//! Confluent wire format through a schema registry) into typed changes.
//! Pure, and never panics on input.
//!
//! Not built yet: it arrives with the apply pipeline.
