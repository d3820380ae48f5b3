"""Start and stop a `kvport server` child process (for benchmarks and tests): the real command line, a config file
it reads, and a wait until it answers. Owns only the child's lifecycle; must not reach into the server's state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class ServerProcess:
    """``kvport server run`` with ``server`` and ``cache`` settings written to a YAML file in ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, server: dict[str, Any], cache: dict[str, Any], env=None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server = server
        self.address = server["address"]
        self.token = server.get("token")
        self.cache = cache
        fd, path = tempfile.mkstemp(prefix="server-", suffix=".yaml", dir=self.workdir)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"server": server, "cache": cache}))  # JSON is YAML
        self.config_path = Path(path)
        self.log_path = self.workdir / f"{self.config_path.stem}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        from kvport.demo.session import engine_env

        env = engine_env(self.workdir) | (self.env or {})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvport.cli.main", "server", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        from kvport.errors import UserError
        from kvport.server.status import fetch_stats

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvport server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                fetch_stats(self.address, self.token, timeout_ms=1000)
                return
            except UserError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvport server did not answer in {timeout} s: {self.log_tail()}") from None
                time.sleep(0.1)

    def stats(self) -> dict[str, Any]:
        from kvport.server.status import fetch_stats

        return fetch_stats(self.address, self.token)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to clean up (what a crash looks like to its clients). Its shared
        memory is then removed here, as the next server started on the machine would, so tests leave none."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            shm_dir = Path(self.server.get("shm_dir", "/dev/shm"))
            for path in shm_dir.glob(f"kvport-{self.proc.pid}-*.l1"):
                path.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
