//! The `regionsync` command: a thin CLI over the library.

use clap::Parser;

/// Applies mirrored Debezium change events from Kafka to this region's
/// PostgreSQL, exactly once in effect, and reports the replication lag.
#[derive(Parser, Debug)]
#[command(name = "regionsync", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run the worker (not built yet: the apply pipeline is the next step).
    Run,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => {
            eprintln!("regionsync run: the apply pipeline is not built yet");
            std::process::ExitCode::from(2)
        }
    }
}
