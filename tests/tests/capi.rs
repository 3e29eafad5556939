//! The C ABI from C: `client/capi/install.sh` installs libtessera, its header and its pkg-config
//! file into a scratch prefix, gcc builds `client/capi/examples/trainer.c` with the two lines the
//! README gives, and the trainer runs against a live `tessera server`: it trains, shares a
//! client across threads, and checks that bad input through the ABI is refused, not a crash.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tessera_tests::{free_port, tessera_bin, ChildGuard, ScratchDir, ServerProc};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

#[track_caller]
fn ok(what: &str, out: &Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout.into_owned()
}

/// Installs libtessera into `prefix` with `install.sh` and returns the compiler flags
/// pkg-config gives for it.
fn install(prefix: &ScratchDir) -> String {
    // libtessera.so sits beside the tessera binary: target/<profile>/.
    let bin = tessera_bin();
    let target = bin.parent().expect("target/<profile>");
    let profile = target.file_name().and_then(|p| p.to_str()).expect("a profile directory").to_string();
    let lib = target.join("libtessera.so");
    assert!(lib.is_file(), "no {}: build it first with cargo build -p tessera-capi", lib.display());

    let install = Command::new(repo().join("client/capi/install.sh"))
        .arg(prefix.path())
        .arg(&profile)
        .env("CARGO_TARGET_DIR", target.parent().expect("target/"))
        .output()
        .expect("run install.sh");
    ok("install.sh", &install);
    // Programs record the SONAME, which links to the versioned file.
    let soname = prefix.path().join("lib/libtessera.so.0");
    assert!(soname.is_symlink() && soname.is_file(), "install.sh made no {}", soname.display());
    let pc_path = prefix.path().join("lib/pkgconfig");
    let flags = Command::new("pkg-config").args(["--cflags", "--libs", "tessera"]).env("PKG_CONFIG_PATH", &pc_path).output().expect("run pkg-config");
    ok("pkg-config", &flags)
}

/// Compiles the C program `source` against the installed library, as `name` in `prefix`.
fn compile(prefix: &ScratchDir, flags: &str, source: &Path, name: &str) -> PathBuf {
    let program = prefix.path().join(name);
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread", "-D_DEFAULT_SOURCE"])
        .arg(source)
        .args(flags.split_whitespace())
        .arg("-lm")
        .arg("-o")
        .arg(&program);
    ok("gcc", &cc.output().expect("run gcc"));
    program
}

#[test]
fn the_c_trainer_builds_with_pkg_config_and_trains_against_a_live_server() {
    let prefix = ScratchDir::new("capi");
    let flags = install(&prefix);
    let trainer = compile(&prefix, &flags, &repo().join("client/capi/examples/trainer.c"), "trainer");
    let needed = Command::new("readelf").arg("-d").arg(&trainer).output().expect("run readelf");
    assert!(ok("readelf", &needed).contains("[libtessera.so.0]"), "the trainer does not record the SONAME libtessera.so.0");
    // The header is C++ too.
    let cxx_check = prefix.write("check.cc", "#include <tessera.h>\nint main() { return tessera_close(0) == TESSERA_ERR_CLOSED ? 0 : 1; }\n");
    let mut cxx = Command::new("g++");
    cxx.arg(&cxx_check).args(flags.split_whitespace()).arg("-o").arg(prefix.path().join("check"));
    if let Ok(out) = cxx.output() {
        ok("g++ on tessera.h", &out);
        ok("the C++ check", &Command::new(prefix.path().join("check")).output().expect("run check"));
    }

    // The server takes only peers holding its cluster secret; the trainer is given it through
    // the environment, as a C program's users would.
    let secret = prefix.write("secret", "the C trainer's cluster secret\n");
    let server = ServerProc::start(&["--shards", "2", "--cluster-secret-file", secret.to_str().unwrap()]);
    run_trainer(&prefix, &trainer, server.addr(), &secret);
    assert!(server.log().lines().all(|l| !l.contains("panicked")), "{}", server.log());

    // Without the secret the trainer cannot connect, and says why.
    let out = Command::new(&trainer).arg(server.addr()).env_remove("TESSERA_CLUSTER_SECRET_FILE").output().expect("run the trainer");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the trainer ran without the secret:\n{said}");
    assert!(said.contains("--cluster-secret-file"), "the trainer's failure does not say why:\n{said}");
}

/// Runs the C trainer against `servers` (comma-separated) with the cluster secret in `secret`,
/// and checks that it trained and that each bad call through the ABI was refused.
fn run_trainer(prefix: &ScratchDir, trainer: &Path, servers: &str, secret: &Path) {
    let (out_path, err_path) = (prefix.path().join("trainer.out"), prefix.path().join("trainer.err"));
    let child = Command::new(trainer)
        .arg(servers)
        .env("TESSERA_CLUSTER_SECRET_FILE", secret)
        .stdout(File::create(&out_path).expect("create the trainer's stdout file"))
        .stderr(File::create(&err_path).expect("create the trainer's stderr file"))
        .spawn()
        .expect("run the trainer");
    let mut guard = ChildGuard::new(child);
    let status = guard.wait_timeout(Duration::from_secs(120));
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the C trainer did not finish in 2 minutes:\n{stdout}\n{stderr}"));
    assert!(status.success(), "the C trainer failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.contains("trainer: ok"), "{stdout}");
    assert_eq!(stdout.matches("refused as expected").count(), 19, "{stdout}");
}

/// The same trainer, through the same calls, against a replicated cluster: a coordinator and
/// three servers, every range on a chain of two. The trainer is given all three addresses.
#[test]
fn the_c_trainer_trains_against_a_replicated_cluster() {
    let prefix = ScratchDir::new("capi-replicated");
    let flags = install(&prefix);
    let trainer = compile(&prefix, &flags, &repo().join("client/capi/examples/trainer.c"), "trainer");
    let secret = prefix.write("secret", "the C trainer's cluster secret\n");
    let secret_arg = secret.to_str().unwrap();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let args = ["--servers", "3", "--replicas", "2", "--ranges", "8", "--workers", "16", "--cluster-secret-file", secret_arg];
    let _coordinator = ServerProc::coordinator_at(&coordinator, &args);
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let servers: Vec<ServerProc> = (0..3)
        .map(|i| {
            let node = (i + 1).to_string();
            let args = ["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", &coordinator, "--cluster-secret-file", secret_arg];
            ServerProc::start_at(&addrs[i], &args)
        })
        .collect();
    run_trainer(&prefix, &trainer, &addrs.join(","), &secret);
    for server in &servers {
        assert!(server.log().lines().all(|l| !l.contains("panicked")), "{}", server.log());
    }
}

/// Runs `program` with `args`, its output going to files in `prefix`; returns the child and the
/// path of its stdout.
fn spawn(prefix: &ScratchDir, program: &Path, args: &[&str]) -> (ChildGuard, PathBuf) {
    let (out_path, err_path) = (prefix.path().join("out"), prefix.path().join("err"));
    let child = Command::new(program)
        .args(args)
        .stdout(File::create(&out_path).expect("create the program's stdout file"))
        .stderr(File::create(&err_path).expect("create the program's stderr file"))
        .spawn()
        .expect("run the program");
    (ChildGuard::new(child), out_path)
}

/// Waits up to `timeout` for `needle` in the file at `path`.
fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A C program keeps SIGPIPE's default action, which ends the process on a write to a closed
/// connection. The library's writes must not raise it: after the server is killed, the
/// trainer's calls fail, and it goes on to exit normally.
#[test]
fn a_c_trainer_survives_its_server_being_killed() {
    let prefix = ScratchDir::new("capi-outage");
    let flags = install(&prefix);
    let program = compile(&prefix, &flags, &repo().join("client/capi/tests/c/outage.c"), "outage");
    let mut server = ServerProc::start(&["--shards", "2"]);
    let (mut child, out) = spawn(&prefix, &program, &[server.addr(), "dies"]);
    assert!(wait_for_text(&out, "pushed 20\n", Duration::from_secs(60)), "the trainer did not start pushing");
    server.kill();
    let status = child.wait_timeout(Duration::from_secs(60)).expect("the trainer did not finish within a minute");
    let said = std::fs::read_to_string(&out).unwrap_or_default();
    let err = std::fs::read_to_string(prefix.path().join("err")).unwrap_or_default();
    assert!(status.success(), "the trainer ended with {status} (141 is SIGPIPE):\n{said}\n{err}");
    assert!(said.contains("push failed") && said.contains("exiting cleanly"), "{said}");
}

/// The C client reconnects by itself: its server, logging every push (`--durability wal`), is
/// killed and started again on the same port, and the trainer goes on pushing with the same
/// client and table handles. The server is a chain of one: the pushes it had not answered are
/// sent again to the restarted server, which applies each once. Every push is answered and in
/// the sums, once.
#[test]
fn a_c_trainer_goes_on_pushing_across_a_server_restart() {
    let prefix = ScratchDir::new("capi-restart");
    let flags = install(&prefix);
    let program = compile(&prefix, &flags, &repo().join("client/capi/tests/c/outage.c"), "outage");
    let data = prefix.path().join("data");
    let args = ["--shards", "2", "--durability", "wal", "--data-dir", data.to_str().unwrap()];
    let mut server = ServerProc::start(&args);
    let addr = server.addr().to_string();
    let (mut child, out) = spawn(&prefix, &program, &[&addr, "restart", "300"]);
    assert!(wait_for_text(&out, "pushed 100\n", Duration::from_secs(60)), "the trainer did not start pushing");
    server.kill();
    std::thread::sleep(Duration::from_millis(200));
    let _server = ServerProc::start_at(&addr, &args);
    let status = child.wait_timeout(Duration::from_secs(120)).expect("the trainer did not finish in 2 minutes");
    let said = std::fs::read_to_string(&out).unwrap_or_default();
    let err = std::fs::read_to_string(prefix.path().join("err")).unwrap_or_default();
    assert!(status.success(), "the trainer ended with {status}:\n{said}\n{err}");
    let last = said.lines().last().unwrap_or_default();
    let words: Vec<&str> = last.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"answered"), "{said}");
    let answered: f32 = words[1].parse().unwrap();
    assert_eq!(answered, 300.0, "{last}");
    for value in &words[7..] {
        let value: f32 = value.parse().unwrap();
        assert_eq!(value, answered, "every push applied once: {last}");
    }
    eprintln!("{last}");
}
