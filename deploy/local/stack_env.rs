//! The local two-region stack's names, ports and local-only credentials, as
//! Rust code reads them: the same environment variables as
//! `deploy/local/env.sh` (the source for scripts), with the same defaults and
//! the same rule, `${NAME:=default}`: a variable that is unset or empty takes
//! its default.
//!
//! This one file is included by path (`#[path = …] mod stack_env;`) wherever
//! Rust needs the stack's addresses: the integration tests' harness
//! (`tests/support`) and the benchmark and demo programs (`tools/`). The
//! tools crate's unit test `stack::tests::defaults_agree_with_env_sh` parses
//! env.sh and fails when a name or a default here differs from it.
#![allow(dead_code)] // each includer reads its own subset

/// The stack's services listen on loopback only (deploy/local/stack.sh).
pub const HOST: &str = "127.0.0.1";

/// One variable of env.sh: its name and its default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
}

impl Var {
    /// The value from the environment, or the default when the variable is
    /// unset or empty (as env.sh's `${NAME:=default}`).
    pub fn get(self) -> String {
        std::env::var(self.name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.default.to_string())
    }

    /// The value as a port; panics naming the variable if it is not one.
    pub fn port(self) -> u16 {
        let v = self.get();
        v.parse()
            .unwrap_or_else(|_| panic!("{} = {v:?} is not a port", self.name))
    }
}

pub const REGION_A: Var = Var {
    name: "REGION_A",
    default: "us-east-1",
};
pub const REGION_B: Var = Var {
    name: "REGION_B",
    default: "eu-west-1",
};
pub const PG_PORT_A: Var = Var {
    name: "PG_PORT_A",
    default: "15432",
};
pub const PG_PORT_B: Var = Var {
    name: "PG_PORT_B",
    default: "25432",
};
pub const KAFKA_PORT_A: Var = Var {
    name: "KAFKA_PORT_A",
    default: "19092",
};
pub const KAFKA_PORT_B: Var = Var {
    name: "KAFKA_PORT_B",
    default: "29092",
};
/// Each broker's KRaft controller listener.
pub const KAFKA_CONTROLLER_PORT_A: Var = Var {
    name: "KAFKA_CONTROLLER_PORT_A",
    default: "19093",
};
pub const KAFKA_CONTROLLER_PORT_B: Var = Var {
    name: "KAFKA_CONTROLLER_PORT_B",
    default: "29094",
};
/// Kafka B's SASL_SSL listener (SCRAM-SHA-512, user `regionsync` with
/// `REGIONSYNC_PASSWORD`; the certificate is signed by
/// `target/stack/tls/ca.pem`).
pub const KAFKA_SASL_PORT_B: Var = Var {
    name: "KAFKA_SASL_PORT_B",
    default: "29093",
};
pub const CONNECT_PORT_A: Var = Var {
    name: "CONNECT_PORT_A",
    default: "18083",
};
pub const CONNECT_PORT_B: Var = Var {
    name: "CONNECT_PORT_B",
    default: "28083",
};
/// The schema registry, shared by both regions.
pub const REGISTRY_PORT: Var = Var {
    name: "REGISTRY_PORT",
    default: "18081",
};
pub const PROMETHEUS_PORT: Var = Var {
    name: "PROMETHEUS_PORT",
    default: "9090",
};
pub const WORKER_METRICS_PORT_A: Var = Var {
    name: "WORKER_METRICS_PORT_A",
    default: "19464",
};
pub const WORKER_METRICS_PORT_B: Var = Var {
    name: "WORKER_METRICS_PORT_B",
    default: "29464",
};
/// Partitions per change topic.
pub const TOPIC_PARTITIONS: Var = Var {
    name: "TOPIC_PARTITIONS",
    default: "4",
};
/// Where the stack keeps its data, logs and pids: relative to the checkout,
/// or absolute ([`state_dir`]).
pub const STACK_DIR: Var = Var {
    name: "STACK_DIR",
    default: "target/stack",
};
/// Local loopback stack only; real deployments take secrets from their own
/// store.
pub const APP_PASSWORD: Var = Var {
    name: "APP_PASSWORD",
    default: "app-local",
};
pub const DEBEZIUM_PASSWORD: Var = Var {
    name: "DEBEZIUM_PASSWORD",
    default: "debezium-local",
};
pub const REGIONSYNC_PASSWORD: Var = Var {
    name: "REGIONSYNC_PASSWORD",
    default: "regionsync-local",
};

/// Every variable of env.sh, in its order.
pub const ALL: [Var; 20] = [
    REGION_A,
    REGION_B,
    PG_PORT_A,
    PG_PORT_B,
    KAFKA_PORT_A,
    KAFKA_PORT_B,
    KAFKA_CONTROLLER_PORT_A,
    KAFKA_CONTROLLER_PORT_B,
    KAFKA_SASL_PORT_B,
    CONNECT_PORT_A,
    CONNECT_PORT_B,
    REGISTRY_PORT,
    PROMETHEUS_PORT,
    WORKER_METRICS_PORT_A,
    WORKER_METRICS_PORT_B,
    TOPIC_PARTITIONS,
    STACK_DIR,
    APP_PASSWORD,
    DEBEZIUM_PASSWORD,
    REGIONSYNC_PASSWORD,
];

/// Every port a service of the stack (the workers included) listens on:
/// stack.sh's `check_ports` checks these are distinct before `up`, and
/// after `down` none is open.
pub const SERVICE_PORTS: [Var; 13] = [
    PG_PORT_A,
    PG_PORT_B,
    KAFKA_PORT_A,
    KAFKA_PORT_B,
    KAFKA_CONTROLLER_PORT_A,
    KAFKA_CONTROLLER_PORT_B,
    KAFKA_SASL_PORT_B,
    CONNECT_PORT_A,
    CONNECT_PORT_B,
    REGISTRY_PORT,
    PROMETHEUS_PORT,
    WORKER_METRICS_PORT_A,
    WORKER_METRICS_PORT_B,
];

/// The stack's state directory (`STACK_DIR`) of the checkout at `root`.
pub fn state_dir(root: &std::path::Path) -> std::path::PathBuf {
    root.join(STACK_DIR.get())
}
