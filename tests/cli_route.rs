//! `regionsync route KEY`: the built binary prints the home region the
//! shared vectors (tests/vectors/route.csv) expect, from `--regions` or from
//! the config's `regions`. Needs no stack.

use std::path::Path;
use std::process::{Command, Output};

const VECTORS: &str = include_str!("vectors/route.csv");

/// The binary with no `REGIONSYNC_*` variable from the caller's environment,
/// so neither a config path nor an override leaks in.
fn regionsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regionsync"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("REGIONSYNC_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run the regionsync binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

/// The vector rows without CSV quoting: (key, regions, home).
fn plain_rows() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    VECTORS
        .lines()
        .skip(1)
        .filter(|line| !line.contains('"'))
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 4, "{line:?}");
            (f[0], f[2].split(';').collect(), f[3])
        })
        .collect()
}

/// The expected home of `key` over `regions`, from the vectors.
fn expected(key: &str, regions: &[&str]) -> &'static str {
    plain_rows()
        .into_iter()
        .find(|(k, r, _)| *k == key && r == regions)
        .map(|(_, _, home)| home)
        .unwrap_or_else(|| panic!("no vector for {key:?} over {regions:?}"))
}

#[test]
fn prints_the_home_region_of_every_plain_vector_row_given_regions() {
    let rows = plain_rows();
    assert!(rows.len() > 100, "{} rows", rows.len());
    for (key, regions, home) in rows {
        let out = run(regionsync()
            .args(["route", key, "--regions"])
            .arg(regions.join(",")));
        assert!(out.status.success(), "{key:?}: {out:?}");
        assert_eq!(
            stdout(&out),
            format!("{home}\n"),
            "{key:?} over {regions:?}"
        );
    }
}

#[test]
fn keys_starting_with_a_hyphen_and_the_empty_key_are_keys() {
    let regions = ["us-east-1", "eu-west-1", "ap-south-1"];
    for key in ["-1", ""] {
        let out = run(regionsync()
            .args(["route", key, "--regions"])
            .arg(regions.join(",")));
        assert!(out.status.success(), "{key:?}: {out:?}");
        assert_eq!(stdout(&out), format!("{}\n", expected(key, &regions)));
    }
    let out = run(regionsync().args(["route", "--regions", "us-east-1,eu-west-1", "--", "-1"]));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("{}\n", expected("-1", &["us-east-1", "eu-west-1"]))
    );
}

fn write_config(dir: &Path, regions: &[&str]) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("regionsync.toml");
    let list: Vec<String> = regions.iter().map(|r| format!("{r:?}")).collect();
    std::fs::write(
        &path,
        format!(
            r#"
region = "eu-west-1"
regions = [{}]
[kafka]
bootstrap_servers = "127.0.0.1:29092"
[postgres]
host = "127.0.0.1"
dbname = "app"
user = "regionsync"
[[tables]]
topics = ["cdc.public.users"]
target = "public.users"
key = ["id"]
"#,
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

#[test]
fn without_regions_it_reads_the_ordered_list_from_the_config() {
    let regions = ["us-east-1", "eu-west-1", "ap-south-1", "us-west-2"];
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_route_config");
    let config = write_config(&dir, &regions);
    for key in ["user-1", "42", "alice@example.com", "Zoë"] {
        let want = format!("{}\n", expected(key, &regions));
        let out = run(regionsync()
            .arg("--config")
            .arg(&config)
            .args(["route", key]));
        assert!(out.status.success(), "{key:?}: {out:?}");
        assert_eq!(stdout(&out), want, "{key:?} with --config");
        let out = run(regionsync()
            .env("REGIONSYNC_CONFIG", &config)
            .args(["route", key]));
        assert!(out.status.success(), "{key:?}: {out:?}");
        assert_eq!(stdout(&out), want, "{key:?} with REGIONSYNC_CONFIG");
    }
}

#[test]
fn a_bad_region_list_or_a_missing_config_is_named_and_exits_2() {
    let out = run(regionsync().args(["route", "k", "--regions", "us-east-1,,us-east-1"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--regions[1]: \"\" is not a region name"),
        "{err}"
    );
    assert!(
        err.contains("--regions[2]: \"us-east-1\" is listed twice"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-regionsync.toml");
    let out = run(regionsync()
        .arg("--config")
        .arg(&missing)
        .args(["route", "k"]));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}
