"""Fixtures shared by every test directory: `bounded_kvport` runs the real `kvport` command in a subprocess under
memory and CPU limits and reports its exit code, output, CPU time and peak memory (for hostile-input tests)."""

from __future__ import annotations

import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Bounded:
    """One bounded run: exit code (negative: killed by that signal), output, wall and CPU seconds, peak RSS."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    maxrss_bytes: int
    timed_out: bool

    def one_line_error(self) -> str:
        """The single stderr line of a refused input; fails the test with what came out otherwise."""
        lines = self.stderr.splitlines()
        assert self.returncode == 2 and len(lines) == 1 and "Traceback" not in self.stderr, self
        return lines[0]


def run_bounded(
    args: list[str], *, memory_bytes: int = 512 << 20, cpu_s: int = 10, timeout_s: float = 20.0, env=None
) -> Bounded:
    """``python -m kvport.cli.main *args`` with RLIMIT_AS = ``memory_bytes`` and RLIMIT_CPU = ``cpu_s``, killed after
    ``timeout_s`` of wall time (a blocked read burns no CPU); the CPU figure is the child's own user + system time,
    steadier than wall time on a loaded 2-core CI box."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))

    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    full_env.pop("KVPORT_CONFIG", None)
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvport.cli.main", *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=full_env,
            preexec_fn=limit,
        )
        # Reaped here with wait4, not by Popen: wait4 gives this child's own CPU time and peak RSS.
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout_s:
                timed_out = True
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
    return Bounded(
        proc.returncode,
        stdout,
        stderr,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss * 1024,  # kB on Linux
        timed_out,
    )


@pytest.fixture
def bounded_kvport():
    return run_bounded
