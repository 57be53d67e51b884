//! The benchmarks' command-line options: `--name VALUE` pairs anywhere on
//! the line, each with a default (no parser crate: the options are few and
//! the Makefile passes them through).

/// `--name VALUE` from the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--name A,B,C` from the command line, or `default`.
pub fn list_arg(name: &str, default: &[u64]) -> Vec<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// The value after `--only`, if given (one encoding or one peer).
pub fn only() -> Option<String> {
    std::env::args().skip_while(|a| a != "--only").nth(1)
}

/// With `-h` or `--help` on the command line: prints `usage` (the program's
/// synopsis) and exits 0, before anything touches the stack.
pub fn exit_if_help(usage: &str) {
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        std::process::exit(0);
    }
}
