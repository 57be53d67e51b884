//! docs/CONFIG.md is the configuration reference: these tests fail when a
//! key of the config structs is missing from it, when it documents a key
//! that does not exist, when its full example is not a valid configuration,
//! or when the environment rules it states do not hold. No stack needed.
//!
//! How the keys are found: the full example of CONFIG.md is parsed into a
//! [`Config`] and serialized to JSON, which writes every field of every
//! struct (unset options as `null`, empty lists and maps included). Each
//! object in that tree is then probed with an unknown field: a config
//! struct refuses it (they all deny unknown fields) and its error names
//! every field the struct has, so the fields that are never serialized
//! (the password) are found too; a map keyed by user names (librdkafka
//! properties, registries per region, column renames, counters) takes it,
//! and only the map's own key is documented, not its entries. The entries
//! of `tables` are written `tables[].<key>`.

use std::collections::BTreeSet;
use std::path::Path;

use regionsync::config::Config;
use serde_json::Value;

const DOC: &str = include_str!("../docs/CONFIG.md");

/// A key no config struct has, to make a struct name all of its fields.
const PROBE: &str = "__probe";

/// The TOML block under CONFIG.md's "Full example" heading.
fn full_example() -> &'static str {
    let section = DOC
        .split("\n## Full example")
        .nth(1)
        .expect("docs/CONFIG.md has a \"## Full example\" section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .expect("the full example is a ```toml block");
    block
        .split("\n```")
        .next()
        .expect("the full example's block is closed")
}

fn example_json() -> Value {
    let config = Config::from_toml(full_example())
        .unwrap_or_else(|e| panic!("CONFIG.md's full example is not a valid config: {e}"));
    serde_json::to_value(&config).expect("a config serializes")
}

/// The object at `path` (object keys; `None` steps into an array's first
/// element) inside `root`.
fn object_at<'v>(root: &'v mut Value, path: &[Option<String>]) -> &'v mut Value {
    path.iter().fold(root, |v, step| match step {
        Some(key) => &mut v[key.as_str()],
        None => &mut v[0],
    })
}

/// The field names of the struct at `path`, from the error of a probe with
/// an unknown field; `None` if the object there takes any key (a map).
fn struct_fields(root: &Value, path: &[Option<String>]) -> Option<Vec<String>> {
    let mut probed = root.clone();
    object_at(&mut probed, path)
        .as_object_mut()
        .expect("probed path is an object")
        .insert(PROBE.to_string(), Value::String(PROBE.to_string()));
    let err = match serde_json::from_value::<Config>(probed) {
        Ok(_) => return None,
        Err(e) => e.to_string(),
    };
    let expected = err
        .strip_prefix(&format!("unknown field `{PROBE}`, expected "))
        .unwrap_or_else(|| panic!("probing {path:?} failed otherwise: {err}"));
    Some(
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

fn dotted(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Every key path of the config under the struct at `path`, written as
/// CONFIG.md writes them (`postgres.host`, `tables[].target`).
fn walk(root: &Value, path: &mut Vec<Option<String>>, prefix: &str, out: &mut BTreeSet<String>) {
    let mut node = root;
    for step in path.iter() {
        node = match step {
            Some(key) => &node[key.as_str()],
            None => &node[0],
        };
    }
    let fields = struct_fields(root, path).expect("walked only into structs");
    for field in fields {
        let key = dotted(prefix, &field);
        out.insert(key.clone());
        match node.get(&field) {
            Some(Value::Object(_)) => {
                path.push(Some(field.clone()));
                if struct_fields(root, path).is_some() {
                    walk(root, path, &key, out);
                }
                path.pop();
            }
            Some(Value::Array(items)) if items.first().is_some_and(Value::is_object) => {
                path.push(Some(field.clone()));
                path.push(None);
                walk(root, path, &format!("{key}[]"), out);
                path.pop();
                path.pop();
            }
            _ => {}
        }
    }
}

fn config_keys() -> BTreeSet<String> {
    let root = example_json();
    let mut keys = BTreeSet::new();
    walk(&root, &mut Vec::new(), "", &mut keys);
    keys
}

/// The first cells of CONFIG.md's reference tables (those headed `| key |`).
fn documented_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut in_reference = false;
    for line in DOC.lines() {
        if !line.starts_with('|') {
            in_reference = false;
            continue;
        }
        let first = line.split('|').nth(1).unwrap_or("").trim();
        if first == "key" {
            in_reference = true;
        } else if in_reference && !first.starts_with("---") {
            keys.insert(first.trim_matches('`').to_string());
        }
    }
    keys
}

#[test]
fn every_config_key_is_in_the_reference() {
    let documented = documented_keys();
    let missing: Vec<String> = config_keys()
        .into_iter()
        .filter(|k| !documented.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/CONFIG.md's reference tables lack these config keys: {missing:?}"
    );
}

#[test]
fn the_reference_documents_no_key_that_does_not_exist() {
    let keys = config_keys();
    let stale: Vec<String> = documented_keys()
        .into_iter()
        .filter(|k| !keys.contains(k))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/CONFIG.md documents keys the config does not have: {stale:?}"
    );
}

#[test]
fn the_walk_finds_nested_keys_and_the_unserialized_password() {
    let keys = config_keys();
    for key in [
        "region",
        "postgres.password",
        "postgres.pool_size",
        "kafka.properties",
        "tables[].counters",
    ] {
        assert!(keys.contains(key), "{key} not found in {keys:?}");
    }
    assert!(
        !keys.iter().any(|k| k.starts_with("kafka.properties.")),
        "map entries are user names, not keys: {keys:?}"
    );
}

/// The environment rules CONFIG.md states, on its full example.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
fn the_environment_rules_of_the_reference_hold() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("regionsync.toml", full_example())?;
        let path = Path::new("regionsync.toml");
        jail.set_env("REGIONSYNC_POSTGRES__HOST", "db.internal");
        jail.set_env("REGIONSYNC_POSTGRES__PORT", "6432");
        jail.set_env("REGIONSYNC_SOURCE_REGIONS", r#"["us-east-1"]"#);
        jail.set_env(
            "REGIONSYNC_KAFKA__PROPERTIES",
            r#"{"security.protocol" = "SASL_SSL", "sasl.mechanism" = "PLAIN"}"#,
        );
        jail.set_env(
            "REGIONSYNC_SCHEMA_REGISTRY__PER_REGION",
            r#"{"us-east-1" = "https://registry.us-east-1.internal"}"#,
        );
        jail.set_env("REGIONSYNC_POSTGRES__PASSWORD", r#""12345""#);
        let c = Config::load(path).map_err(|e| e.to_string())?;
        assert_eq!(c.postgres.host, "db.internal");
        assert_eq!(c.postgres.port, 6432);
        assert_eq!(c.source_regions, ["us-east-1"]);
        assert_eq!(
            c.kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SASL_SSL")
        );
        assert_eq!(
            c.kafka.properties.get("sasl.mechanism").map(String::as_str),
            Some("PLAIN")
        );
        assert_eq!(
            c.registry_for("us-east-1"),
            Some("https://registry.us-east-1.internal")
        );
        assert!(
            c.kafka.properties.len() > 2,
            "the file's other properties stay: {:?}",
            c.kafka.properties
        );
        let password = c.postgres_password().map_err(|e| e.to_string())?;
        assert_eq!(password.as_ref().map(|p| p.expose()), Some("12345"));

        // Unquoted, a password of digits is read as a number and refused.
        jail.set_env("REGIONSYNC_POSTGRES__PASSWORD", "12345");
        let err = Config::load(path).expect_err("a number is not a password");
        assert!(
            err.to_string().to_lowercase().contains("postgres.password"),
            "{err}"
        );
        jail.set_env("REGIONSYNC_POSTGRES__PASSWORD", "s3cret");

        // A table's keys cannot be set one by one from the environment.
        jail.set_env("REGIONSYNC_TABLES__0__POLICY", "lww");
        assert!(Config::load(path).is_err(), "tables are set in the file");
        Ok(())
    });
}

#[test]
fn the_full_example_sets_every_key() {
    let lines: Vec<&str> = full_example()
        .lines()
        .map(|l| l.trim().trim_start_matches("# "))
        .collect();
    let unset: Vec<String> = config_keys()
        .into_iter()
        .filter(|key| {
            let leaf = key.rsplit('.').next().unwrap_or(key).trim_end_matches("[]");
            !lines.iter().any(|l| {
                l.starts_with(&format!("{leaf} ="))
                    || *l == format!("[{key}]")
                    || *l == format!("[[{leaf}]]")
            })
        })
        .collect();
    assert!(
        unset.is_empty(),
        "CONFIG.md's full example does not show these keys: {unset:?}"
    );
}
