"""`kvport bench server` end to end on tiny sizes: a real server process, every case measured and reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.servers
pytest.importorskip("zmq", reason="pyzmq is not installed (nox -s e2e)")


def test_bench_server_reports_every_case(tmp_path) -> None:
    from kvport.demo.session import engine_env

    out = tmp_path / "bench.json"
    args = ["--tokens", "512", "--lookup-tokens", "4096", "--layers", "1", "--repeat", "2", "--lookups", "20"]
    proc = subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", "bench", "server", "--device", "cpu", *args, "--json", str(out)],
        env=engine_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["lookup"]["chunks"] == 16
    for case in ("cached_keys", "equal_copy", "fresh_request", "derive_keys_only", "in_process_l1", "miss"):
        assert 0 < result["lookup"][case]["p50_ms"] <= result["lookup"][case]["p99_ms"]
    for cache in ("in_process", "server"):
        assert result["throughput"][cache]["store_gbps"] > 0 and result["throughput"][cache]["load_gbps"] > 0
    assert result["throughput"]["server"]["staged"] is False
    assert "ratio" in proc.stdout and "p99" in proc.stdout
