"""Fixtures for the server tests: a real `kvport server` process per module and client processes to kill."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# These modules import the server client (pyzmq) at collection; without pyzmq (the cpu sessions, where their `servers`
# marker deselects them anyway) they are not collected at all rather than failing to import.
collect_ignore = [] if importlib.util.find_spec("zmq") else ["test_dashboard.py", "test_server.py"]


class Client:
    """A tests/server/client_proc.py process stopped at its first output line."""

    def __init__(self, mode: str, address: str, seed: int, count: int) -> None:
        from kvport.demo.session import engine_env

        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "client_proc.py"), mode, address, str(seed), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=engine_env(HERE),
        )
        self.line = self.proc.stdout.readline().strip()
        if not self.line:
            self.proc.kill()
            raise RuntimeError(f"client {mode} failed: {self.proc.stderr.read()[-2000:]}")

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait(10)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def spawn_client():
    pytest.importorskip("zmq", reason="pyzmq is not installed (nox -s e2e)")
    clients: list[Client] = []

    def spawn(mode: str, address: str, seed: int, count: int) -> Client:
        client = Client(mode, address, seed, count)
        clients.append(client)
        return client

    yield spawn
    for client in clients:
        if client.proc.poll() is None:
            client.kill9()
