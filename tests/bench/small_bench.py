"""Test helper: a `kvport bench kernels` Bench as the GPU bench tests build it (the benchmark's model size, one
256-token chunk, the cuda backend, a 2048^3 GEMM load, few repetitions); each test names what it varies."""

from __future__ import annotations


def small_bench(layouts: list[str], directions: list[str], paths: list[str], loads: list[str], repeat=3, **extra):
    from kvport.bench._kernel_cases import Bench
    from kvport.bench.kernels import BENCH_DIMS

    return Bench(
        layouts=layouts,
        tokens=[256],
        directions=directions,
        paths=paths,
        loads=loads,
        backends=["cuda"],
        repeat=repeat,
        dims=BENCH_DIMS,
        gemm_n=2048,
        **extra,
    )
