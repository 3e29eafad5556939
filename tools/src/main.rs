//! `tessera`: run a parameter server, train the demo model against it, measure it, inspect it.

mod bench;
mod checkpoint;
mod common;
mod coordinator;
mod demo;
mod diskbench;
mod drain;
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train sparse logistic regression by asynchronous SGD through a parameter server.
    Demo(demo::DemoArgs),
    /// Run a server until interrupted.
    Server(server::ServerArgs),
    /// Keep a replicated cluster's configuration (members, chains, epochs) until interrupted.
    Coordinator(coordinator::CoordinatorArgs),
    /// Remove a server from a replicated cluster gracefully, while training goes on.
    Drain(drain::DrainArgs),
    /// Measure push and pull latency and throughput, against a raw-socket baseline.
    Bench(bench::BenchArgs),
    /// Show a running server's tables, parts, clocks and counters, or a replicated cluster's chains.
    Status(status::StatusArgs),
    /// Take a checkpoint now, or verify and inspect a data directory.
    Checkpoint(checkpoint::CheckpointArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    common::init_logging(&cli.log);
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
