"""setup.py itself: an explicit target whose compiler is missing stops the build with one clear line."""

import os
import subprocess
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def run_setup(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"KVPORT_TARGET", "BUILD_WITH_HIP", "KVPORT_NVCC"}}
    env |= {"PATH": os.path.dirname(sys.executable)} | env_extra  # a PATH with no nvcc or hipcc on it
    return subprocess.run(
        [sys.executable, str(SETUP), "--name"], env=env, capture_output=True, text=True, cwd=SETUP.parent
    )


def test_cuda_without_nvcc_fails_with_one_line():
    done = run_setup({"KVPORT_TARGET": "cuda"})
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "kvport build: KVPORT_TARGET=cuda needs nvcc on PATH (or KVPORT_NVCC pointing at it); "
        "install it or set KVPORT_TARGET=none"
    ]


def test_build_with_hip_without_hipcc_fails_with_one_line():
    done = run_setup({"BUILD_WITH_HIP": "1"})
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert "KVPORT_TARGET=hip needs hipcc" in done.stderr
