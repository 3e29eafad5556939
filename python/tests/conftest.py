"""Fixtures: real `tessera server` processes on loopback, as tests/src/lib.rs's ServerProc starts
them. The binary is $TESSERA_BIN (tests/run.sh exports it), else target/debug/tessera."""

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 20


def tessera_bin() -> Path:
    path = Path(os.environ.get("TESSERA_BIN", ROOT / "target" / "debug" / "tessera"))
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build -p tessera-tools`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `tessera server` process; `addr` is "127.0.0.1:port". Killed on `stop()`."""

    def __init__(self, *args: str, addr: str = "", shards: int = 2, tool: str = "server"):
        self.dir = tempfile.TemporaryDirectory(prefix="tessera-py-")
        self.log_path = Path(self.dir.name) / "server.log"
        self.args = args
        self.shards = shards
        self.tool = tool
        for _ in range(8):
            self.addr = addr or f"127.0.0.1:{free_port()}"
            if self._spawn():
                return
            if addr or "in use" not in self.log():
                break
        raise RuntimeError(f"tessera server {args} did not start:\n{self.log()}")

    def _spawn(self) -> bool:
        cmd = [str(tessera_bin()), self.tool, "--listen", self.addr, *self.args]
        if self.tool == "server":
            cmd += ["--shards", str(self.shards), "--no-pin"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        host, port = self.addr.rsplit(":", 1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if "listening on" in self.log():
                try:
                    socket.create_connection((host, int(port)), timeout=0.5).close()
                    return True
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        return False

    def pause(self) -> None:
        """SIGSTOP: the server answers nothing until resume(). Returns once every thread of it
        is stopped (the signal is delivered asynchronously)."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = [Path(t, "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{self.proc.pid}/task").iterdir()]
            if all(state in "tT" for state in states):
                return
            time.sleep(0.005)
        raise RuntimeError("the server did not stop")

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.dir.cleanup()


@pytest.fixture
def server():
    with Server() as s:
        yield s


@pytest.fixture(scope="module")
def shared_server():
    """One server for a module's tests; each test uses its own table names."""
    with Server() as s:
        yield s


class Cluster:
    """A replicated cluster: `tessera coordinator` (embedded configuration) and three servers
    joining it, every range on a chain of two. `addrs` lists the servers."""

    def __init__(self, servers: int = 3, replicas: int = 2, server_args: tuple = ()):
        # A failure timeout of 2 s, not 500 ms: the servers share this machine's cores with the
        # trainers, and a server that misses heartbeats under that load leaves its chains.
        args = ("--servers", str(servers), "--replicas", str(replicas), "--ranges", "8", "--workers", "16", "--failure-timeout-ms", "2000")
        self.coordinator = Server(*args, tool="coordinator")
        self.servers = [Server("--node-id", str(node), "--coordinator", self.coordinator.addr, *server_args) for node in range(1, servers + 1)]
        self.addrs = [s.addr for s in self.servers]

    def stop(self) -> None:
        for s in [*self.servers, self.coordinator]:
            s.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in [*self.servers, self.coordinator]:
            s.__exit__(*exc)
