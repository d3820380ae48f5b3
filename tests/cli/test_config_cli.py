"""`kvport config check` in a real, bounded process: settings printed for a good file, one line and exit 2 for a bad
one (including files that hung or raised tracebacks in the cache config loader), within a second of CPU."""

from __future__ import annotations

import os

import pytest


def test_check_prints_the_effective_settings(tmp_path, bounded_kvport):
    path = tmp_path / "kv.yaml"
    path.write_text("cache:\n  chunk_tokens: 128\n  l1_bytes: 64MiB\n  l2_path: ~/kv\n")
    run = bounded_kvport(["config", "check", str(path)], env={"HOME": str(tmp_path)})
    assert run.returncode == 0 and run.stderr == "", run
    lines = run.stdout.splitlines()
    assert "chunk_tokens         128" in lines and f"l1_bytes             {64 << 20}" in lines
    assert f"l2_path              '{tmp_path}/kv'" in lines


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: os.mkfifo(p), "cannot read: a FIFO, expected a regular file"),
        (lambda p: p.write_bytes("chunk_tokens: 1\n".encode("utf-16")), "cannot read: UTF-16 text"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), "cannot read: binary or UTF-16/32 content"),
        (lambda p: p.write_text("salt: " + "[" * 10000 + "]" * 10000 + "\n"), "nested deeper than 32 levels"),
        (
            lambda p: p.write_text(
                "salt: &a [x, x, x, x, x, x, x, x]\n"
                + "".join(f"x{i}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 8) + "]\n" for i in range(8))
            ),
            "values once aliases are expanded",
        ),
        (lambda p: p.write_text("l1_bytes: 1000TiB\n"), "l1_bytes=1000 TiB is more than this machine's memory"),
    ],
    ids=["fifo", "utf-16", "binary", "deep", "alias-bomb", "l1-beyond-memory"],
)
def test_check_refuses_a_hostile_file_in_one_line(tmp_path, bounded_kvport, make, reason):
    path = tmp_path / "kv.yaml"
    make(path)
    run = bounded_kvport(["config", "check", str(path)], memory_bytes=256 << 20, timeout_s=10)
    line = run.one_line_error()
    assert line.startswith("kvport config: cache config") and reason in line, line
    assert run.cpu_s < 1.0, run


def test_dev_zero_as_the_config_is_refused_at_once(bounded_kvport):
    run = bounded_kvport(["config", "check", "/dev/zero"], memory_bytes=256 << 20, timeout_s=10)
    assert run.one_line_error() == (
        "kvport config: cache config /dev/zero: cannot read: a character device, expected a regular file"
    )
