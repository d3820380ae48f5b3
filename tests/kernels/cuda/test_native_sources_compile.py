"""The native kernels compile for CUDA (nvcc) and for AMD through the HIP compat header (hipcc), like CI does.
Each compile takes ~15 s, so these are marked slow; they skip where the compiler is missing."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess

import pytest

from kvport._build.compile import build_native, cuda_sources
from kvport._build.target import resolve_target

pybind11 = pytest.importorskip("pybind11")

pytestmark = pytest.mark.slow


def test_one_op_per_file():
    names = {p.stem for p in cuda_sources()}
    assert {"gather", "scatter", "memcpy_batch", "copy_bytes"} <= names


@pytest.mark.parametrize(
    "env",
    [
        {"KVPORT_TARGET": "cuda", "KVPORT_CUDA_ARCHS": "90"},
        {"KVPORT_TARGET": "hip", "KVPORT_HIP_ARCHS": "gfx90a"},
    ],
    ids=["nvcc", "hipcc"],
)
def test_native_module_builds(env, tmp_path):
    compiler = {"cuda": "nvcc", "hip": "hipcc"}[env["KVPORT_TARGET"]]
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not on PATH")
    target = resolve_target(env)
    out = tmp_path / f"_native_{target.name}.so"
    build_native(target, tmp_path / "obj", out, pybind11.get_include(), log=lambda *a: None)
    assert out.stat().st_size > 0
    # The module loads without a GPU, and the one feature switch (vendor.h / hip/compat.h) came through:
    # nvcc >= 12.8 has cudaMemcpyBatchAsync, the HIP build always copies per region.
    spec = importlib.util.spec_from_file_location(out.stem, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TARGET == target.name
    assert module.HAS_BATCHED_MEMCPY is (target.name == "cuda" and _nvcc_version(target.compiler) >= (12, 8))
    # ...and reaches the planner through the backend (kvport.hal.transfer.planner: dma_batched).
    from kvport.hal.backends.native import CudaBackend, HipBackend

    backend = CudaBackend() if target.name == "cuda" else HipBackend()
    backend._module = module
    assert backend.batched_copies is module.HAS_BATCHED_MEMCPY


def _nvcc_version(nvcc: str) -> tuple[int, int]:
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"release (\d+)\.(\d+)", text).groups()
    return int(major), int(minor)
