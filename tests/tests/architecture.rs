//! ARCHITECTURE.md names every workspace crate and every `tessera` command, and this test keeps
//! it so: a crate added to the workspace, or a subcommand added to the CLI, without a line in
//! ARCHITECTURE.md fails here, naming what is missing.
//!
//! The crates come from the root Cargo.toml's `members`. The commands come from the CLI's source:
//! the `tessera` binary has no library target to ask for its clap `Command`, and this test should
//! not need a build of it, so it reads the variants of the `#[derive(Subcommand)]` enums in
//! `tools/src` (clap names a variant `FooBar` as `foo-bar`). When `TESSERA_BIN` names a built
//! binary, its `--help` is checked against the same list, so the parsing cannot drift from what
//! clap really offers.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace root").to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The quoted strings of the root Cargo.toml's `members = [...]`.
fn workspace_members(cargo_toml: &str) -> Vec<String> {
    let start = cargo_toml.find("\nmembers").expect("the root Cargo.toml has a `members` list");
    let rest = &cargo_toml[start..];
    let open = rest.find('[').expect("`members = [`");
    let close = rest.find(']').expect("`members = [...]` is closed");
    rest[open + 1..close].split(',').map(|item| item.trim().trim_matches('"').to_string()).filter(|item| !item.is_empty()).collect()
}

/// `FooBar` → `foo-bar`, as clap's derive names subcommands.
fn kebab(variant: &str) -> String {
    let mut out = String::new();
    for (i, c) in variant.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The variants of the first `#[derive(.. Subcommand ..)]` enum in `source`, in order: the
/// identifiers that open a line at the enum's own indentation plus four spaces.
fn subcommand_variants(source: &str) -> Option<Vec<String>> {
    let mut lines = source.lines().skip_while(|l| !(l.trim_start().starts_with("#[derive(") && l.contains("Subcommand")));
    lines.next()?;
    let header = lines.find(|l| l.contains("enum "))?;
    let indent = header.len() - header.trim_start().len() + 4;
    let mut variants = Vec::new();
    for line in lines {
        let body = line.trim_start();
        let depth = line.len() - body.len();
        if depth < indent && body.starts_with('}') {
            break;
        }
        if depth == indent && body.starts_with(|c: char| c.is_ascii_uppercase()) {
            let name: String = body.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            variants.push(name);
        }
    }
    Some(variants)
}

/// Every `tessera` command, as a user types it: `demo`, ..., and `checkpoint verify` for a
/// subcommand whose own module defines subcommands.
fn tessera_commands(root: &Path) -> Vec<String> {
    let tools = root.join("tools/src");
    let main = read(&tools.join("main.rs"));
    let top = subcommand_variants(&main).expect("tools/src/main.rs defines the `tessera` subcommands with #[derive(Subcommand)]");
    assert!(!top.is_empty(), "no subcommands found in tools/src/main.rs: has the CLI moved? Update this test");
    let mut commands = Vec::new();
    for variant in top {
        let name = kebab(&variant);
        let module = name.replace('-', "_");
        let file = [tools.join(format!("{module}.rs")), tools.join(&module).join("mod.rs")].into_iter().find(|p| p.is_file());
        let nested = file.and_then(|f| subcommand_variants(&read(&f))).unwrap_or_default();
        commands.push(name.clone());
        commands.extend(nested.iter().map(|v| format!("{name} {}", kebab(v))));
    }
    commands
}

/// The command names under `Commands:` in clap's help text.
fn help_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l[2..].starts_with(' ')) // a wrapped description's next line
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn architecture_names_every_crate_and_every_tessera_command() {
    let root = root();
    let architecture = read(&root.join("ARCHITECTURE.md"));
    let mut missing = Vec::new();

    let members = workspace_members(&read(&root.join("Cargo.toml")));
    assert!(members.len() >= 2, "parsed too few workspace members from Cargo.toml: {members:?}");
    for member in &members {
        if !architecture.contains(&format!("`{member}`")) && !architecture.contains(&format!("`{member}/`")) {
            missing.push(format!("the workspace crate `{member}` (write it in backticks, e.g. in the crate table)"));
        }
    }

    let commands = tessera_commands(&root);
    for command in &commands {
        if !architecture.contains(&format!("tessera {command}")) {
            missing.push(format!("the command `tessera {command}` (add it to the commands table)"));
        }
    }

    assert!(missing.is_empty(), "ARCHITECTURE.md does not name:\n  {}\n", missing.join("\n  "));
}

#[test]
fn the_parsed_commands_match_the_binarys_help_when_it_is_built() {
    let Some(bin) = std::env::var_os("TESSERA_BIN") else {
        eprintln!("TESSERA_BIN is not set: the commands were read from tools/src only");
        return;
    };
    let output = std::process::Command::new(&bin).arg("--help").output().expect("run $TESSERA_BIN --help");
    let help = String::from_utf8_lossy(&output.stdout);
    let from_help = help_commands(&help);
    let parsed: Vec<String> = tessera_commands(&root()).into_iter().filter(|c| !c.contains(' ')).collect();
    assert_eq!(parsed, from_help, "the subcommands parsed from tools/src differ from `tessera --help`; fix the parser in this test");
}

#[test]
fn the_parsers_read_what_they_should() {
    let toml = "[workspace]\nresolver = \"2\"\nmembers = [\"engine\", \"client/capi\"]\ndefault-members = [\"x\"]\n";
    assert_eq!(workspace_members(toml), ["engine", "client/capi"]);
    assert_eq!(kebab("Checkpoint"), "checkpoint");
    assert_eq!(kebab("ListenBacklog"), "listen-backlog");
    let source = "#[derive(Debug, Subcommand)]\nenum What {\n    /// Doc.\n    Now {\n        connect: String,\n    },\n    Verify { dir: PathBuf },\n    Inspect(Args),\n}\nenum Other {\n    Not,\n}\n";
    assert_eq!(subcommand_variants(source).unwrap(), ["Now", "Verify", "Inspect"]);
    let help = "Usage: tessera\n\nCommands:\n  demo    Train\n  server  Run\n  help    Print\n\nOptions:\n  --log\n";
    assert_eq!(help_commands(help), ["demo", "server"]);
}
