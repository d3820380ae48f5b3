"""`kvport bench storage` against real servers on 127.0.0.1 (redis-server; mooncake_master + a storage node): the
report, JSON figures, the PNG and --verify, in a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvport.testing.servers import MooncakeServer, RedisServer, find_binary

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.servers


def kvport(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _check(proc: subprocess.CompletedProcess, out: Path, png: Path, client: str) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raw store" in proc.stdout and "vs raw" in proc.stdout and "0 chunks differed" in proc.stdout
    result = json.loads(out.read_text())
    assert result["chunks"] == 8 and result["batch"] == 2 and result["hit_rate"] == 1.0
    assert result["verified_mismatches"] == 0 and result["raw"]["client"] == client
    for phase in ("store", "load"):
        row = result[phase]
        assert row["mbps"] > 0 and row["chunk_p99_ms"] >= row["chunk_p50_ms"] > 0
        assert abs(row["ratio_to_raw"] - row["mbps"] / result["raw"][phase]["mbps"]) < 1e-9
    assert result["lookup"]["hit_p50_us"] > 0 and result["lookup"]["samples"] >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ARGS = ("--chunk-mb", "0.25", "--chunks", "8", "--rounds", "1", "--batch", "2", "--verify")


@pytest.mark.skipif(
    find_binary("redis-server") is None or importlib.util.find_spec("redis") is None, reason="no redis-server/client"
)
def test_redis_backend(tmp_path):
    pytest.importorskip("matplotlib")
    with RedisServer(tmp_path / "srv") as srv:
        out, png = tmp_path / "r.json", tmp_path / "r.png"
        proc = kvport("bench", "storage", "--backend", srv.url, *ARGS, "--json", str(out), "--plot", str(png))
        _check(proc, out, png, "redis-py pipelined SET/GET")
        assert srv.client().dbsize() == 0  # the benchmark removed what it stored


@pytest.mark.skipif(
    find_binary("mooncake_master") is None or importlib.util.find_spec("mooncake") is None, reason="no Mooncake"
)
def test_mooncake_backend(tmp_path):
    pytest.importorskip("matplotlib")
    with MooncakeServer(tmp_path / "srv") as srv:
        out, png = tmp_path / "m.json", tmp_path / "m.png"
        proc = kvport("bench", "storage", "--backend", srv.url, *ARGS, "--json", str(out), "--plot", str(png))
        _check(proc, out, png, "Mooncake batch_put_from/batch_get_into")


def test_unreachable_server_is_one_line(tmp_path):
    from kvport.testing.servers import free_port

    proc = kvport("bench", "storage", "--backend", f"redis://:hunter2@127.0.0.1:{free_port()}/0", "--chunks", "2")
    if importlib.util.find_spec("redis") is None:
        pytest.skip("the redis client is not installed")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Connection refused" in proc.stderr or "ConnectionError" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
