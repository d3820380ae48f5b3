# ruff: noqa: E401, E501, E702, E731, B007, B023, F821  (kept as run; its lambdas run inside the loop that binds them)
"""Device: timeline of an 8K-token NHD staged move (4 pieces) under the 2048^3 graph load and alone, per piece:
kernel (gather/scatter) and host copy start/end on their streams, ms from the move's first event."""

import random
import sys

import torch

from kvport.bench._kernel_cases import Bench, sized_layout
from kvport.bench.kernels import BENCH_DIMS
from kvport.hal.transfer import executor as ex
from kvport.layouts import allocate
from kvport.testing.gpu import backend_or_skip

marks = []


def mark(label):
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    marks.append((label, ev))


real_kernel, real_to, real_from = ex.Transfer._kernel, ex._Work.to_hosts, ex._Work.from_hosts


def k(self, direction, work, buf, n, keep):
    mark("kernel>")
    real_kernel(self, direction, work, buf, n, keep)
    mark("kernel<")


def th(self, buf):
    mark("copy>")
    real_to(self, buf)
    mark("copy<")


def fh(self, buf):
    mark("copy>")
    real_from(self, buf)
    mark("copy<")


ex.Transfer._kernel, ex._Work.to_hosts, ex._Work.from_hosts = k, th, fh

spec = sized_layout("vllm-flash-nhd", BENCH_DIMS)
tokens = 8192
need = -(-tokens // spec.groups[0].tokens_per_block)
kv = allocate(spec, 2 * need + 2, device="cuda", fill="zeros")
ids = random.Random(0).sample(range(2 * need + 2), need)
d = kv.descriptor
host = torch.empty(d.canonical_bytes(tokens), dtype=torch.uint8, pin_memory=True)
t = ex.Transfer(backend_or_skip("cuda"), "cuda")
b = Bench(
    layouts=None,
    tokens=[],
    directions=[],
    paths=[],
    loads=["gemm"],
    backends=None,
    repeat=3,
    dims=BENCH_DIMS,
    gemm_n=2048,
)
load = torch.cuda.Stream()
for direction in [] if sys.argv[1:] else ["d2h", "h2d"]:
    for loaded in (False, True):
        fn = (
            (lambda: t.to_host(d, ids, host, tokens, path="staged"))
            if direction == "d2h"
            else (lambda: t.from_host(host, d, ids, tokens, path="staged"))
        )
        fn()
        torch.cuda.synchronize()
        if loaded:
            b.gemm_solo_ms()
            load.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(load):
                for _ in range(120):
                    b.load_step()
        marks.clear()
        for rep in range(3):
            mark(f"== move {rep}")
            fn()
        mark("end")
        torch.cuda.synchronize()
        t0 = marks[0][1]
        line = " ".join(f"{lab}{t0.elapsed_time(ev):.2f}" for lab, ev in marks)
        print(f"{direction} {'load' if loaded else 'alone'}: {line}", flush=True)

print(
    "--- through Bench._enqueue + Bench._under_load (the benchmark's own case), per move: first mark, last mark, gaps > 0.1 ms"
)
b2 = Bench(
    layouts=None,
    tokens=[],
    directions=[],
    paths=[],
    loads=["gemm"],
    backends=["cuda"],
    repeat=10,
    dims=BENCH_DIMS,
    gemm_n=2048,
)
for direction in sys.argv[1:] or ["d2h", "h2d"]:
    chosen, one = b2._enqueue(d, ids, tokens, direction, "cuda", "staged", d.canonical_bytes(tokens))
    for rnd in range(2):
        marks.clear()
        ms, gemm = b2._under_load(one)
        torch.cuda.synchronize()
        evs = [(lab, ev) for lab, ev in marks if not lab.startswith("==") and lab != "end"]
        t0 = evs[0][1]
        times = sorted(t0.elapsed_time(ev) for _, ev in evs)
        copies = [
            (t0.elapsed_time(a[1]), t0.elapsed_time(bb[1]))
            for a, bb in zip(evs, evs[1:])
            if a[0] == "copy>" and bb[0] == "copy<"
        ]
        copies.sort()
        gaps = [(round(c1[1], 2), round(c2[0] - c1[1], 2)) for c1, c2 in zip(copies, copies[1:]) if c2[0] - c1[1] > 0.1]
        rate = [round(256 / 1024 / ((e - s) / 1e3), 1) for s, e in copies]
        ratio = d.canonical_bytes(tokens) / ms / 1e6 / b2.memcpy_gbps(direction, d.canonical_bytes(tokens))
        print(
            f"{direction} round {rnd}: {ms:.2f} ms/move ratio {ratio:.3f} gemm {gemm:.2f}; copies {len(copies)}, GB/s min {min(rate)} max {max(rate)}; gaps (at, ms) {gaps[:12]}",
            flush=True,
        )
