"""`kvport bench storage` end to end in a real subprocess: report, JSON figures, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kvport(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_storage_bench_small_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    target = tmp_path / "disk"
    proc = kvport(
        "bench", "storage", "--backend", f"local-disk:{target}", "--chunk-mb", "1", "--chunks", "6",
        "--index-chunks", "300", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "store" in proc.stdout and "ratio" in proc.stdout and "lookup (300 chunks indexed)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["chunk_bytes"] == 1 << 20 and result["chunks"] == 6
    for phase in ("store", "load"):
        assert result[phase]["gbps"] > 0 and result[phase]["p99_ms"] >= result[phase]["p50_ms"] > 0
        raw = result["raw"]["write_gbps" if phase == "store" else "read_gbps"]
        assert abs(result[phase]["ratio_to_raw"] - result[phase]["gbps"] / raw) < 1e-9
    assert result["lookup"]["indexed_chunks"] == 300
    assert 0 < result["lookup"]["hit_p50_us"] <= result["lookup"]["hit_p99_us"]
    assert set(result["targets"]) >= {"store_met", "load_met", "lookup_met"}
    assert list(target.iterdir()) == []  # the benchmark cleaned up after itself


def test_storage_bench_cold_mode_runs(tmp_path):
    proc = kvport(
        "bench", "storage", "--backend", f"local-disk:{tmp_path}", "--chunk-mb", "0.5", "--chunks", "4",
        "--index-chunks", "0", "--cold",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cold page cache" in proc.stdout


def test_storage_bench_user_errors(tmp_path):
    for args, message in (
        (["--backend", "s3:bucket"], "unknown storage tier 's3'"),
        (["--backend", "local-disk"], "expected local-disk:/path"),
        (["--backend", f"local-disk:{tmp_path}", "--chunks", "1"], "--chunks 1"),
        (["--backend", f"local-disk:{tmp_path}", "--chunk-mb", "1e-7"], "--chunk-mb 1e-07"),  # under one byte
        (["--backend", "local-disk:/proc"], "cannot create"),  # exists, but no directory can be made in it
    ):
        proc = kvport("bench", "storage", *args)
        assert proc.returncode == 2
        assert message in proc.stderr and "Traceback" not in proc.stderr
