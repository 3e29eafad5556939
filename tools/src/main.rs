//! `tessera`: run a parameter server, train the demo model against it, measure it, inspect it.

mod bench;
mod checkpoint;
mod common;
mod coordinator;
mod demo;
mod diskbench;
mod drain;
mod metrics;
mod server;
mod status;

use clap::{Parser, Subcommand};

/// Tessera: a parameter server for distributed machine-learning training.
///
/// Workers push gradients and pull parameters; servers keep them in pinned memory, one shard per
/// core, and aggregate pushes with server-side updaters (sum, sgd, adagrad, adam, ftrl).
///
/// Start with `tessera demo`: it starts a server in this process and trains a logistic-regression
/// model on a generated data set through it.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or per-module directives).
    #[arg(long, global = true, default_value = "warn", env = "TESSERA_LOG")]
    log: String,
    /// Log format: text (for people) or json (one object per line, for log collectors).
    #[arg(long, global = true, default_value = "text", env = "TESSERA_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// Each subcommand's help is its arguments' doc comment (in its module): a doc comment here
// would replace it, and `--help` would lose the long text.
#[derive(Debug, Subcommand)]
enum Command {
    Demo(demo::DemoArgs),
    Server(server::ServerArgs),
    Coordinator(coordinator::CoordinatorArgs),
    Drain(drain::DrainArgs),
    Bench(bench::BenchArgs),
    Status(status::StatusArgs),
    Checkpoint(checkpoint::CheckpointArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    common::init_logging(&cli.log, cli.log_format == "json");
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Server(args) => server::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Drain(args) => drain::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Status(args) => status::run(args),
        Command::Checkpoint(args) => checkpoint::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
