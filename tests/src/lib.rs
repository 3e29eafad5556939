//! Helpers for the process-level tests: find the `tessera` binary, run servers and tools from it,
//! and talk to servers in hand-built frames ([`raw`]).
//!
//! Every child process is killed when its handle drops, every wait has a deadline, and every
//! address is on 127.0.0.1, so a failing test neither hangs nor leaks processes. A test that
//! panics prints the logs of the servers it started.

#![deny(unsafe_code)]

pub mod raw;

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start listening before the test gives up on it.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts at starting a server on a freshly picked port (another process may take the port
/// between our probe and the server's bind).
const START_ATTEMPTS_MAX: usize = 5;

/// The `tessera` binary: `$TESSERA_BIN`, or the one `cargo build -p tessera-tools` put beside
/// this test's profile directory (`target/<profile>/deps/<test>` → `target/<profile>/tessera`).
pub fn tessera_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TESSERA_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "TESSERA_BIN={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join(format!("tessera{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "no tessera binary at {}: build it first: cargo build -p tessera-tools", bin.display());
    bin
}

/// A port on 127.0.0.1 that was free a moment ago: bound, read and released; never one this
/// process was given before. (The kernel may hand a released port out again at once: a test
/// that took ports for a coordinator and its servers before starting any got the same one
/// twice, and a server failed to bind.)
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("a bound address").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A directory under the system's temp dir, removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new, empty directory whose name includes `label`.
    pub fn new(label: &str) -> ScratchDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("tessera-tests-{label}-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for ScratchDir {
    /// Removes the directory, unless a test is failing and `TESSERA_TESTS_KEEP` is set: then it
    /// stays (server logs, data directories) for a look, and its path is printed.
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("TESSERA_TESTS_KEEP").is_some() {
            eprintln!("kept {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait on a child"))
    }

    /// Waits up to `timeout` for the child to exit; kills it and returns `None` if it did not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Kills the child with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tessera server` process on 127.0.0.1, with its stderr in a log file.
#[derive(Debug)]
pub struct ServerProc {
    child: ChildGuard,
    addr: String,
    log: PathBuf,
    _dir: ScratchDir,
}

impl ServerProc {
    /// Starts `tessera server --listen 127.0.0.1:<free port> <args>` and waits until it serves.
    pub fn start(args: &[&str]) -> ServerProc {
        ServerProc::start_env(args, &[]).unwrap_or_else(|log| panic!("tessera server {args:?} did not start:\n{log}"))
    }

    /// As [`ServerProc::start`], with `env` set in the server's environment; a server that exits
    /// before it serves gives its exit status and log.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Result<ServerProc, String> {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS_MAX {
            let addr = format!("127.0.0.1:{}", free_port());
            match ServerProc::spawn_tool("server", &addr, args, env) {
                Ok(server) => return Ok(server),
                // Someone took the port between our probe and the bind: pick another.
                Err(log) if log.contains("in use") => last = log,
                Err(log) => return Err(log),
            }
        }
        panic!("tessera server {args:?} did not start after {START_ATTEMPTS_MAX} ports:\n{last}");
    }

    /// Starts a server on a given address (for clusters, whose addresses are fixed up front).
    pub fn start_at(addr: &str, args: &[&str]) -> ServerProc {
        ServerProc::spawn(addr, args).unwrap_or_else(|log| panic!("tessera server on {addr} {args:?} did not start:\n{log}"))
    }

    /// Starts `tessera coordinator` on a given address.
    pub fn coordinator_at(addr: &str, args: &[&str]) -> ServerProc {
        ServerProc::spawn_tool("coordinator", addr, args, &[]).unwrap_or_else(|log| panic!("tessera coordinator on {addr} {args:?} did not start:\n{log}"))
    }

    /// Spawns the server on `addr` and waits for it to listen; on failure returns its log.
    pub fn spawn(addr: &str, args: &[&str]) -> Result<ServerProc, String> {
        ServerProc::spawn_tool("server", addr, args, &[])
    }

    /// Spawns `tessera <tool> --listen addr <args>`, with `env` added to its environment, and
    /// waits for it to listen.
    fn spawn_tool(tool: &str, addr: &str, args: &[&str], env: &[(&str, &str)]) -> Result<ServerProc, String> {
        let dir = ScratchDir::new("server");
        let log = dir.path().join("server.log");
        let err = File::create(&log).expect("create the server log");
        let child = Command::new(tessera_bin())
            .args([tool, "--listen", addr])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", tessera_bin().display()));
        let mut server = ServerProc { child: ChildGuard::new(child), addr: addr.to_string(), log, _dir: dir };
        let sock: SocketAddr = addr.parse().expect("a numeric address");
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", server.log()));
            }
            // The line is printed once the tables exist and the control plane serves.
            if server.log().contains("listening on") && TcpStream::connect_timeout(&sock, Duration::from_millis(500)).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("not serving after {SERVER_START_TIMEOUT:?}:\n{}", server.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear in the log.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to `timeout` for the server to exit by itself; `None` (and it is killed) if it
    /// did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// Freezes the process (SIGSTOP): it holds its connections and answers nothing, as a hung
    /// server does, until [`resume`](Self::resume). Returns once every thread has stopped.
    pub fn freeze(&self) {
        signal(self.pid(), "-STOP");
        wait_stopped(self.pid());
    }

    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.child.is_some() && self.child.try_wait().is_none()
    }

    /// `kill -9`: the server gets no chance to close anything cleanly.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!("---- log of tessera server {} ----\n{}---- end of log ----", self.addr, self.log());
        }
    }
}

/// A real etcd server (Debian's `etcd-server`) on loopback, in a scratch directory, with
/// elections tuned for a test (50 ms heartbeats, so leases as short as a second hold).
#[derive(Debug)]
pub struct EtcdProc {
    child: ChildGuard,
    endpoint: String,
    _dir: ScratchDir,
}

impl EtcdProc {
    pub fn start() -> EtcdProc {
        let dir = ScratchDir::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let log = File::create(dir.path().join("etcd.log")).expect("create etcd's log");
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}): install Debian's etcd-server (tests/run.sh does)"));
        let mut etcd = EtcdProc { child: ChildGuard::new(child), endpoint: format!("127.0.0.1:{client}"), _dir: dir };
        let sock: SocketAddr = etcd.endpoint.parse().expect("a numeric address");
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_err() {
            if let Some(status) = etcd.child.try_wait() {
                panic!("etcd exited with {status}");
            }
            assert!(Instant::now() < deadline, "etcd did not listen within {SERVER_START_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        etcd
    }

    /// Its client endpoint, `127.0.0.1:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Freezes etcd (SIGSTOP): it holds its connections and answers nothing, as a hung or
    /// partitioned etcd does, until [`resume`](Self::resume).
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
        wait_stopped(self.child.id());
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// Waits until every thread of `pid` is stopped (`T` in `/proc/PID/task/*/stat`): `kill -STOP`
/// returns once the signal is sent, not once every thread has taken it.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = |stat: String| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string));
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        let states: Vec<Option<String>> = tasks.iter().map(|t| std::fs::read_to_string(t.path().join("stat")).ok().and_then(state)).collect();
        if !states.is_empty() && states.iter().all(|s| matches!(s.as_deref(), Some("T") | Some("t"))) {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop within 10 s of SIGSTOP: thread states {states:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What a finished `tessera` invocation printed.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tessera <args>` to completion, killing it and panicking if it takes over `timeout`.
pub fn run_tool(args: &[&str], timeout: Duration) -> ToolOutput {
    let dir = ScratchDir::new("tool");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let child = Command::new(tessera_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", tessera_bin().display()));
    let mut child = ChildGuard::new(child);
    let status = child.wait_timeout(timeout);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    match status {
        Some(status) => ToolOutput { status, stdout, stderr },
        None => panic!("tessera {args:?} did not finish within {timeout:?}; killed.\nstdout:\n{stdout}\nstderr:\n{stderr}"),
    }
}

/// True when an RDMA device is here; false on a plain host, where an RDMA test returns early after
/// saying it did not run. Under the SoftRoCE harness (`SOFTROCE_VM`) or with `RDMA_DEV` set, a
/// missing device fails the test instead: there it must not pass by doing nothing.
#[cfg(feature = "rdma")]
pub fn rdma_here(test: &str) -> bool {
    use tessera_transport::{RdmaConfig, TransportKind};
    let required = std::env::var_os("SOFTROCE_VM").is_some() || std::env::var_os("RDMA_DEV").is_some();
    match tessera_transport::select::choose(TransportKind::Rdma, &RdmaConfig::default()) {
        Ok(_) => true,
        Err(e) if required => panic!("{test}: an RDMA device was required but: {e}"),
        Err(e) => {
            eprintln!("{test}: NOT RUN on this host ({e}); run it under tests/softroce/run.sh");
            false
        }
    }
}

pub mod counting;
pub use counting::{allocations, Counting};

/// Allocations counted while a warm [`tessera_client::Client`] connected to `addr` (as
/// `config`'s worker), warmed up by `warm` rounds, makes rounds of calls on dense "dense" (at
/// least 256 keys of dim 8) and sparse "sparse" (dim 4): a range push and pull, a key-list push
/// and pull, each at a clock that advances every round, as a training worker's do (so every
/// reply carries a stamp). The calling test installs [`Counting`] as its global allocator; every
/// allocation in the process is counted, the server's included when it runs in the same process.
/// Returns the fewest counted in any of `windows` windows of `rounds` rounds: periodic work that
/// allocates (a cluster's heartbeats, its client's check of the configuration once a second, a
/// range's history of updates until it is full) lands in some windows but not in all of them,
/// while an allocation per call lands in every one.
pub fn cluster_round_allocations(addr: &str, config: tessera_client::ClientConfig, warm: u64, windows: u64, rounds: u64) -> u64 {
    with_client_rounds(addr, config, "dense", "sparse", |round| {
        (1..=warm).for_each(&mut *round);
        let mut fewest = u64::MAX;
        for window in 0..windows {
            let first = warm + 1 + window * rounds;
            let before = allocations();
            (first..first + rounds).for_each(&mut *round);
            fewest = fewest.min(allocations() - before);
        }
        fewest
    })
}

/// Connects a client to `addr` and hands `count` a round of its calls on `dense` and `sparse`
/// (see [`cluster_round_allocations`]), to make at the clocks it gives.
fn with_client_rounds<T>(addr: &str, config: tessera_client::ClientConfig, dense: &str, sparse: &str, count: impl FnOnce(&mut dyn FnMut(u64)) -> T) -> T {
    use tessera_client::Client;
    let worker = config.worker as usize;
    let client = Client::connect(&[addr], config).expect("connect");
    let (dense, sparse) = (client.table(dense).expect("dense table"), client.table(sparse).expect("sparse table"));
    let grads = vec![0.25f32; 256 * 8];
    let mut out = vec![0f32; 256 * 8];
    let keys: Vec<u64> = (0..64).map(|i| i * 61 + 7).collect();
    let mut round = |clock: u64| {
        client.set_clock(clock);
        let stamp = client.push_range(&dense, 0, &grads).and_then(|t| t.wait()).expect("range push");
        assert_eq!(stamp.get(worker), clock, "the range push's stamp shows this clock");
        client.pull_range(&dense, 0, &mut out).and_then(|t| t.wait()).expect("range pull");
        client.push(&sparse, &keys, &grads[..keys.len() * 4]).and_then(|t| t.wait()).expect("key-list push");
        client.pull(&sparse, &keys, &mut out[..keys.len() * 4]).and_then(|t| t.wait()).expect("key-list pull");
    };
    count(&mut round)
}

/// `GET /metrics` from a `--metrics` address; the Prometheus text, or what went wrong.
pub fn try_scrape(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let sock: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| format!("connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").map_err(|e| format!("ask {addr}: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("{addr}: not an HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr} answered {head:?}"));
    }
    Ok(body.to_string())
}

/// [`try_scrape`], panicking on failure.
pub fn scrape(addr: &str) -> String {
    try_scrape(addr).unwrap_or_else(|e| panic!("scraping metrics: {e}"))
}

/// Every sample of `name` in Prometheus text whose labels contain each of `labels`
/// (`shard="0"` and the like).
pub fn samples<'a>(text: &'a str, name: &'a str, labels: &'a [&'a str]) -> impl Iterator<Item = f64> + 'a {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(move |l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|want| rest.contains(want))).then(|| value.parse::<f64>().ok()).flatten()
    })
}

/// The sum of [`samples`]; `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    samples(text, name, labels).fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}
