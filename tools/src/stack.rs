//! The local two-region stack as the programs see it: its names and
//! addresses, read through the one module the integration tests read them
//! through too (deploy/local/stack_env.rs: the variables of
//! deploy/local/env.sh, with its defaults), the repository root, and the
//! pids `stack.sh` recorded. Region A is the source side of every benchmark
//! and of the demo; region B applies.

use std::path::PathBuf;

#[path = "../../deploy/local/stack_env.rs"]
pub mod env;

pub use env::HOST;

/// The repository root (tools/ is one level below it).
pub fn root() -> PathBuf {
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tools.parent().map(PathBuf::from).unwrap_or(tools)
}

/// Region A's name (`REGION_A`), the source region.
pub fn region_a() -> String {
    env::REGION_A.get()
}

/// Region B's name (`REGION_B`), the applying region.
pub fn region_b() -> String {
    env::REGION_B.get()
}

/// The name MirrorMaker 2 gives, in B's Kafka, to `topic` of region A.
pub fn mirrored(topic: &str) -> String {
    format!("{}.{topic}", region_a())
}

pub fn pg_port_a() -> u16 {
    env::PG_PORT_A.port()
}

pub fn pg_port_b() -> u16 {
    env::PG_PORT_B.port()
}

/// Region A's Kafka bootstrap address.
pub fn kafka_a() -> String {
    format!("{HOST}:{}", env::KAFKA_PORT_A.port())
}

/// Region B's Kafka bootstrap address.
pub fn kafka_b() -> String {
    format!("{HOST}:{}", env::KAFKA_PORT_B.port())
}

/// Region A's Kafka Connect REST API.
pub fn connect_a() -> String {
    format!("http://{HOST}:{}", env::CONNECT_PORT_A.port())
}

/// Region B's Kafka Connect REST API.
pub fn connect_b() -> String {
    format!("http://{HOST}:{}", env::CONNECT_PORT_B.port())
}

/// The schema registry's Confluent-compatible API (what regionsync reads).
pub fn registry_ccompat_url() -> String {
    format!(
        "http://{HOST}:{}/apis/ccompat/v7",
        env::REGISTRY_PORT.port()
    )
}

/// The schema registry's own API (what the Connect converters use).
pub fn registry_v2_url() -> String {
    format!(
        "http://{HOST}:{}/apis/registry/v2",
        env::REGISTRY_PORT.port()
    )
}

/// Partitions per change topic.
pub fn topic_partitions() -> i32 {
    let v = env::TOPIC_PARTITIONS.get();
    v.parse()
        .unwrap_or_else(|_| panic!("TOPIC_PARTITIONS = {v:?} is not a number"))
}

/// The `regionsync` role's password (the JDBC sink uses the role too).
pub fn regionsync_password() -> String {
    env::REGIONSYNC_PASSWORD.get()
}

/// The pid recorded by `stack.sh` for one of the stack's services.
pub fn stack_pid(service: &str) -> u32 {
    std::fs::read_to_string(env::state_dir(&root()).join(format!("pids/{service}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid for {service}: is the stack up (make stack-up)?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `NAME=default` pairs of env.sh's `: "${NAME:=default}"` lines.
    fn env_sh_defaults(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|line| {
                let rest = line.trim().strip_prefix(": \"${")?;
                let (name, rest) = rest.split_once(":=")?;
                let (default, _) = rest.split_once("}\"")?;
                Some((name.to_string(), default.to_string()))
            })
            .collect()
    }

    /// deploy/local/stack_env.rs says what deploy/local/env.sh says: the
    /// same variables, in the same order, with the same defaults. A
    /// variable added to, renamed in or re-defaulted in either file fails
    /// here until the other follows.
    #[test]
    fn defaults_agree_with_env_sh() {
        let path = root().join("deploy/local/env.sh");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let in_sh = env_sh_defaults(&text);
        let in_rust: Vec<(String, String)> = env::ALL
            .iter()
            .map(|v| (v.name.to_string(), v.default.to_string()))
            .collect();
        assert!(
            !in_sh.is_empty(),
            "no `: \"${{NAME:=default}}\"` lines found in {}",
            path.display()
        );
        assert_eq!(
            in_rust, in_sh,
            "deploy/local/stack_env.rs and deploy/local/env.sh disagree"
        );
    }

    /// stack.sh's `check_ports` checks the ports that stack_env.rs's
    /// `SERVICE_PORTS` lists (the ports tests/stack_lifecycle.rs finds
    /// closed after `down`): one list, in both languages.
    #[test]
    fn stack_sh_checks_the_service_ports() {
        let path = root().join("deploy/local/stack.sh");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let body = text
            .split_once("check_ports() {")
            .and_then(|(_, rest)| rest.split_once("; do"))
            .map(|(list, _)| list)
            .unwrap_or_else(|| panic!("no check_ports loop in {}", path.display()));
        let listed: Vec<&str> = body
            .split_once(" in ")
            .map_or("", |(_, names)| names)
            .split_whitespace()
            .filter(|w| *w != "\\")
            .collect();
        let ours: Vec<&str> = env::SERVICE_PORTS.iter().map(|v| v.name).collect();
        assert_eq!(
            listed, ours,
            "stack.sh check_ports and stack_env.rs SERVICE_PORTS disagree"
        );
    }

    #[test]
    fn the_parser_reads_env_sh_lines() {
        let text =
            ": \"${KAFKA_PORT_A:=19092}\"       # the controller\n# : \"${NOT:=this}\"\nfoo=bar\n";
        assert_eq!(
            env_sh_defaults(text),
            vec![("KAFKA_PORT_A".to_string(), "19092".to_string())]
        );
    }

    #[test]
    fn an_empty_variable_takes_its_default_as_in_env_sh() {
        let var = env::Var {
            name: "REGIONSYNC_TOOLS_TEST_EMPTY_VARIABLE",
            default: "d",
        };
        std::env::set_var(var.name, "");
        assert_eq!(var.get(), "d");
        std::env::set_var(var.name, "v");
        assert_eq!(var.get(), "v");
        std::env::remove_var(var.name);
        assert_eq!(var.get(), "d");
    }
}
