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

/// The process's allocator. glibc's gives the pages of a freed block of a few hundred KiB back
/// to the kernel (trimming its heap), so a replicated chain's members, which allocate every large
/// update they take and free it once applied, faulted in fresh zeroed pages for each one.
/// jemalloc keeps freed pages for a while: `tessera bench --replicas 3 --sizes 256K`'s push p50
/// fell from 7.9–9.8× an unreplicated push's to 4.5–5.8× (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use clap::CommandFactory;

    use super::Cli;

    /// Every long flag of every `tessera` subcommand.
    fn flags(cmd: &clap::Command, into: &mut BTreeSet<String>) {
        into.extend(cmd.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")));
        into.extend(["--help".to_string(), "--version".to_string()]);
        cmd.get_subcommands().for_each(|sub| flags(sub, into));
    }

    fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                into.push(path);
            }
        }
    }

    /// The `--flag` words in the string literals of one line of code that read as messages: a
    /// literal with a space in it, and not a command line for another program (cargo, fio).
    fn flags_named(line: &str) -> Vec<String> {
        let code = line.trim_start();
        if code.starts_with("//") || code.contains("'\"'") {
            return Vec::new();
        }
        let literals = code.split('"').skip(1).step_by(2);
        let messages = literals.filter(|l| l.contains(' ') && !l.contains("cargo "));
        let words = messages.flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).map(str::to_string).collect::<Vec<_>>());
        words.filter(|w| w.len() > 2 && w.starts_with("--") && w.as_bytes()[2].is_ascii_lowercase()).collect()
    }

    #[test]
    fn the_scanner_finds_flags_in_messages_and_not_elsewhere() {
        assert_eq!(flags_named(r#"bail!("raise --workers-max or --shards, please")"#), ["--workers-max", "--shards"]);
        // Built, so that this file's own literals hold no unknown flag for the scan below.
        let comment = format!("/// raise {}", "--nothing-here");
        assert!(flags_named(&comment).is_empty(), "comments are not messages");
        assert!(flags_named(r#".args(["--rw=write", "--direct=1"])"#).is_empty(), "another program's arguments");
        assert!(flags_named(r#""replay: cargo run --release --example sim""#).is_empty(), "a cargo command");
    }

    /// An error that tells a user to pass a flag must name one that `tessera` has.
    #[test]
    fn every_flag_an_error_message_names_exists() {
        let mut known = BTreeSet::new();
        flags(&Cli::command(), &mut known);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
        let mut files = Vec::new();
        for krate in ["engine", "transport", "replication", "client", "tools"] {
            sources(&root.join(krate).join("src"), &mut files);
        }
        let mut dangling = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("a readable source file");
            for (n, line) in text.lines().enumerate() {
                for flag in flags_named(line).into_iter().filter(|f| !known.contains(f)) {
                    dangling.push(format!("{}:{}: {flag}", file.strip_prefix(root).unwrap_or(file).display(), n + 1));
                }
            }
        }
        assert!(files.len() > 50, "found only {} source files under {}", files.len(), root.display());
        assert!(dangling.is_empty(), "messages name flags that `tessera` does not have:\n{}", dangling.join("\n"));
    }
}
