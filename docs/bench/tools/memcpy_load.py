# ruff: noqa: E401, E501, E702, E731, B007, B023, F821  (kept as run; its lambdas run inside the loop that binds them)
"""Device: a plain pinned memcpy of 1 GiB (and 32 MiB) under the benchmark's loads, ratio to the same memcpy alone:
is the staged 8K D2H loss under short GEMMs (0.87-0.90) the copy itself?"""

import torch

from kvport.bench._kernel_cases import Bench
from kvport.bench.kernels import BENCH_DIMS

for n in (2048, 8192):
    b = Bench(
        layouts=None,
        tokens=[],
        directions=[],
        paths=[],
        loads=["none", "gemm"],
        backends=None,
        repeat=10,
        dims=BENCH_DIMS,
        gemm_n=n,
    )
    for nbytes in (1 << 30, 32 << 20):
        h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        for direction, fn in (
            ("d2h", lambda: h.copy_(d, non_blocking=True)),
            ("h2d", lambda: d.copy_(h, non_blocking=True)),
        ):
            one = b._time(fn, 2)
            alone = b._time(fn, b._reps(one))
            for rnd in range(2):
                ms, gemm = b._under_load(fn)
                print(
                    f"gemm {n} {nbytes >> 20:5d} MiB {direction}: under load / alone {alone / ms:.3f}  (GEMM {gemm:.2f})",
                    flush=True,
                )
        del h, d
    del b
    torch.cuda.empty_cache()
