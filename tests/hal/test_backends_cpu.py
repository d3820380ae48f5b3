"""The Triton and native backends on a machine without a GPU: honest refusals, never a crash."""

from __future__ import annotations

import pytest

from kvport.hal.backends.native import CudaBackend, HipBackend
from kvport.hal.backends.triton import TritonBackend
from kvport.hal.platform import PlatformInfo
from kvport.hal.registry import BACKENDS, load_backend

CPU = PlatformInfo("cpu", None, 0, "2.x", {})
CUDA = PlatformInfo("cuda", "H100", 1, "2.x", {})


def test_registered_with_priorities():
    prio = {name: load_backend(name).priority for name in ("torch", "triton", "cuda", "hip")}
    assert set(BACKENDS) >= {"torch", "triton", "cuda", "hip"}
    assert prio["cuda"] == prio["hip"] == 20 > prio["triton"] == 10 > prio["torch"] == 0


def test_native_refuses_cpu_platform_with_reason():
    verdict = CudaBackend().available(CPU)
    assert not verdict and "cuda platform" in verdict.reason
    assert not HipBackend().available(CUDA)


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    verdict = TritonBackend().available(CPU)
    assert not verdict and "TRITON_INTERPRET" in verdict.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend().available(CPU)


def test_native_not_expected_without_build_record():
    from kvport.hal.native import read_build_info

    if (read_build_info() or {}).get("target") == "cuda":
        pytest.skip("this install has a cuda build record")
    assert not CudaBackend().expected(CUDA)
