"""`kvport bench kernels` on a machine without a GPU: one-line refusal, parser, table and plot formatting."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvport.bench import kernels

ROOT = Path(__file__).resolve().parents[2]


def _no_gpu() -> bool:
    torch = pytest.importorskip("torch")
    return not torch.cuda.is_available()


def test_refuses_without_gpu_in_one_line():
    if not _no_gpu():
        pytest.skip("a GPU is present")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", "bench", "kernels", "--layout", "vllm-flash-nhd"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA/ROCm device" in lines[0]
    assert "Traceback" not in done.stderr


def test_parser_accepts_the_documented_flags():
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(
        "--layout a --layout b --tokens 8192 --tokens 256 --direction d2h --path dma --path auto --load gemm "
        "--json out.json --plot out.png --piece-mib 64 --zero-copy-programs 16 --gemm-n 2048 --whole-blocks".split()
    )
    assert args.whole_blocks and not parser.parse_args([]).whole_blocks
    assert args.layout == ["a", "b"] and args.tokens == [8192, 256] and args.path == ["dma", "auto"]
    assert args.load == ["gemm"] and args.json == Path("out.json") and args.piece_mib == 64 and args.gemm_n == 2048
    assert parser.parse_args(["--load", "engine", "--load", "none"]).load == ["engine", "none"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--direction", "sideways"])


RESULT = {
    "device": "Test GPU",
    "torch": "2.x",
    "memcpy": {"d2h_gbps": 55.0, "h2d_gbps": 54.0, "d2d_gbps": 3000.0},
    "records": [
        dict(
            layout="vllm-flash-nhd",
            backend="cuda",
            direction="d2h",
            tokens=8192,
            path="staged",
            path_used="staged",
            load="none",
            bytes=1 << 30,
            ms=20.0,
            gbps=53.7,
            memcpy_gbps=55.0,
            ratio_to_memcpy=0.976,
            gemm_ratio=None,
        ),
        dict(
            layout="vllm-flash-nhd",
            backend="cuda",
            direction="d2h",
            tokens=8192,
            path="dma",
            load="gemm",
            skipped="too many regions",
        ),
        dict(
            layout="vllm-mla",
            backend="cuda",
            direction="d2h",
            tokens=256,
            path="auto",
            path_used="staged",
            load="engine",
            bytes=9 << 20,
            ms=0.194,
            gbps=48.6,
            memcpy_gbps=52.7,
            ratio_to_memcpy=0.923,
            gemm_ratio=None,
            engine_wait_ms=0.018,
            memcpy_engine_wait_ms=0.183,
        ),
        dict(
            layout="vllm-flash-nhd",
            backend="triton",
            direction="h2d",
            tokens=256,
            path="zero-copy",
            load="none",
            error="RuntimeError: boom",
        ),
    ],
}


def test_table_shows_ratio_skip_and_error():
    text = kernels.format_table(RESULT)
    assert "Test GPU" in text and "0.976" in text
    assert "skipped: too many regions" in text and "ERROR RuntimeError: boom" in text
    engine = next(line for line in text.splitlines() if "engine" in line)
    assert "0.923" in engine and engine.rstrip().endswith("0.018 (0.183)")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "k.png"
    kernels.plot(RESULT, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_records_carry_the_comparison_fields(tmp_path):
    path = tmp_path / "r.json"
    kernels._atomic_write(path, json.dumps(RESULT))
    rec = json.loads(path.read_text())["records"][0]
    for field in ("layout", "backend", "direction", "tokens", "path", "load", "bytes", "gbps", "ratio_to_memcpy"):
        assert field in rec


def test_unwritable_outputs_are_user_errors(tmp_path):
    """--json/--plot into a missing directory: a one-line user error, not a traceback after the run."""
    from kvport.errors import UserError

    missing = tmp_path / "no-such-dir"
    with pytest.raises(UserError, match="--json .*cannot write"):
        kernels._atomic_write(missing / "r.json", "{}")
    if importlib.util.find_spec("matplotlib") is not None:
        with pytest.raises(UserError, match="--plot .*cannot write"):
            kernels.plot(RESULT, missing / "k.png")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--tokens 0", "--tokens 0: expected a positive token count"),
        ("--tokens 256 --tokens -8", "--tokens -8: expected a positive token count"),
        ("--repeat 0", "--repeat 0: expected a positive number"),
        ("--piece-mib 0", "--piece-mib 0: expected a positive number"),
        ("--zero-copy-programs -1", "--zero-copy-programs -1: expected a positive CTA/program count"),
        ("--gemm-n 0", "--gemm-n 0: expected at least 256"),
    ],
)
def test_bad_flag_values_are_one_line_errors_on_any_machine(flags, message, capsys):
    from kvport.cli.main import main

    assert main(["bench", "kernels", *flags.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kvport bench: {message}"


def test_cache_bench_checks_the_gemm_size_before_any_device(capsys):
    from kvport.cli.main import main

    assert main(["bench", "cache", "--gemm-n", "100"]) == 2
    assert capsys.readouterr().err.strip() == "kvport bench: --gemm-n 100: expected at least 256"
