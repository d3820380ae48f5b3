"""`kvport bench storage` end to end in a real subprocess: report, JSON figures, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_chunk_size_that_is_not_a_finite_positive_size_is_one_line(tmp_path, bounded_kvport):
    for value in ("nan", "inf", "-inf", "0", "-1"):
        run = bounded_kvport(["bench", "storage", "--backend", f"local-disk:{tmp_path}", f"--chunk-mb={value}"])
        line = run.one_line_error()
        assert line.endswith("expected a positive size of at least one byte") and "--chunk-mb" in line
    # 1e12 MiB: refused before a buffer is allocated, with what the machine has.
    run = bounded_kvport(["bench", "storage", "--backend", f"local-disk:{tmp_path}", "--chunk-mb", "1e12"])
    assert "GiB of memory for its buffers" in run.one_line_error()
    assert run.maxrss_bytes < 256 << 20
    assert list(tmp_path.iterdir()) == []


def _in_tmpfs(tmp_path, options: str, *bench_args: str) -> subprocess.CompletedProcess:
    """The benchmark on a real, small tmpfs mounted in a private user and mount namespace (no root needed where
    unprivileged user namespaces are allowed); skips where they are not."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o {options} tmpfs {mnt} || exit 99\n"
        f'exec "{sys.executable}" -m kvport.cli.main bench storage --backend local-disk:{mnt} "$@"\n'
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script, "sh", *bench_args], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no unshare(1) here")
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()}")
    return proc


SMALL = ("--chunk-mb", "1", "--chunks", "8", "--rounds", "1", "--index-chunks", "0")
PROGRESS = ("kvport bench storage: ", "round ", "writing ", "  ")


def _one_error_line(stderr: str) -> str:
    """The error: the last stderr line; every line before it is a progress line."""
    *progress, error = stderr.splitlines()
    assert all(line.startswith(PROGRESS) for line in progress), stderr
    assert error.startswith("kvport bench: "), stderr
    return error


def test_a_disk_too_small_for_the_run_is_refused_before_writing(tmp_path):
    proc = _in_tmpfs(tmp_path, "size=4m", *SMALL)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr  # refused before the plan line
    assert "the benchmark writes 16.0 MiB, 4.0 MiB is free there" in proc.stderr


@pytest.mark.parametrize("inodes", [5, 7])  # out of inodes at the tier's first chunk / at the tier's directories
def test_a_disk_that_fills_during_the_run_is_one_line(tmp_path, inodes):
    # Plenty of bytes, few inodes: the filesystem answers ENOSPC half-way through, as a full disk does.
    proc = _in_tmpfs(tmp_path, f"size=64m,nr_inodes={inodes}", *SMALL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = _one_error_line(proc.stderr)
    assert "No space left on device" in error or "failed under" in error, proc.stderr


def test_storage_bench_says_what_it_writes_and_reports_each_round(tmp_path):
    """Progress goes to stderr even without a terminal: the plan (sizes, directory) first, then one line per round."""
    proc = kvport(
        "bench", "storage", "--backend", f"local-disk:{tmp_path}", "--chunk-mb", "0.25", "--chunks", "4",
        "--rounds", "2", "--index-chunks", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("kvport bench storage: 2 round(s) of 4 chunks of 0.25 MiB under ")
    assert "(writes 4 MiB, kept until the end)" in lines[0]
    assert [line.split(" (")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"]
    assert any(line.startswith("writing 8 index chunks") for line in lines)


def test_storage_bench_default_size_is_modest():
    import argparse

    from kvport.bench.storage import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backend", "local-disk:/tmp/x"])
    assert args.rounds * 2 * args.chunks * args.chunk_mb <= 2048  # MiB on disk at most
