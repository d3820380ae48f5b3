"""`kvport server` refusals through the real command: one line and exit 2, never a traceback."""

from __future__ import annotations

import importlib.util

import pytest


def test_server_without_action_or_server_says_so(bounded_kvport, tmp_path) -> None:
    assert "expected an action" in bounded_kvport(["server"], memory_bytes=2 << 30).one_line_error()
    line = bounded_kvport(
        ["server", "status", "--address", f"ipc://{tmp_path}/none.sock"], memory_bytes=2 << 30
    ).one_line_error()
    assert "no kvport server" in line or "pyzmq" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--address", "tcp://8.8.8.8:5555"], "loopback"),
        (["--address", "ipc://relative"], "absolute"),
        (["--l1-bytes", "lots"], "byte count"),
    ],
)
def test_server_run_refuses_bad_settings_in_one_line(bounded_kvport, args, needle) -> None:
    if importlib.util.find_spec("zmq") is None:
        line = bounded_kvport(["server", "run", *args], memory_bytes=2 << 30).one_line_error()
        assert "pyzmq" in line
        return
    line = bounded_kvport(["server", "run", *args], memory_bytes=2 << 30, timeout_s=60, cpu_s=30).one_line_error()
    assert needle in line
