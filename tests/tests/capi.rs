//! The C ABI from C: `client/capi/install.sh` installs libtessera, its header and its pkg-config
//! file into a scratch prefix, gcc builds `client/capi/examples/trainer.c` with the two lines the
//! README gives, and the trainer runs against a live `tessera server`: it trains, shares a
//! client across threads, and checks that bad input through the ABI is refused, not a crash.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tessera_tests::{tessera_bin, ChildGuard, ScratchDir, ServerProc};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repository").to_path_buf()
}

#[track_caller]
fn ok(what: &str, out: &Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    stdout.into_owned()
}

#[test]
fn the_c_trainer_builds_with_pkg_config_and_trains_against_a_live_server() {
    // libtessera.so sits beside the tessera binary: target/<profile>/.
    let bin = tessera_bin();
    let target = bin.parent().expect("target/<profile>");
    let profile = target.file_name().and_then(|p| p.to_str()).expect("a profile directory").to_string();
    let lib = target.join("libtessera.so");
    assert!(lib.is_file(), "no {}: build it first with cargo build -p tessera-capi", lib.display());

    let prefix = ScratchDir::new("capi");
    let install = Command::new(repo().join("client/capi/install.sh"))
        .arg(prefix.path())
        .arg(&profile)
        .env("CARGO_TARGET_DIR", target.parent().expect("target/"))
        .output()
        .expect("run install.sh");
    ok("install.sh", &install);
    let pc_path = prefix.path().join("lib/pkgconfig");
    let flags = Command::new("pkg-config").args(["--cflags", "--libs", "tessera"]).env("PKG_CONFIG_PATH", &pc_path).output().expect("run pkg-config");
    let flags = ok("pkg-config", &flags);
    let trainer = prefix.path().join("trainer");
    let mut cc = Command::new("gcc");
    cc.args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg(repo().join("client/capi/examples/trainer.c"))
        .args(flags.split_whitespace())
        .arg("-lm")
        .arg("-o")
        .arg(&trainer);
    ok("gcc", &cc.output().expect("run gcc"));
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
    let (out_path, err_path) = (prefix.path().join("trainer.out"), prefix.path().join("trainer.err"));
    let child = Command::new(&trainer)
        .arg(server.addr())
        .env("TESSERA_CLUSTER_SECRET_FILE", &secret)
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
    assert_eq!(stdout.matches("refused as expected").count(), 17, "{stdout}");
    assert!(server.log().lines().all(|l| !l.contains("panicked")), "{}", server.log());

    // Without the secret the trainer cannot connect, and says why.
    let out = Command::new(&trainer).arg(server.addr()).env_remove("TESSERA_CLUSTER_SECRET_FILE").output().expect("run the trainer");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the trainer ran without the secret:\n{said}");
    assert!(said.contains("--cluster-secret-file"), "the trainer's failure does not say why:\n{said}");
}
