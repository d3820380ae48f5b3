"""`kvport bench kernels`: every layout x backend x path vs pinned memcpy of the same bytes, alone and under GEMM load.
Owns the measurement loop, its table, JSON and plot; must not hold kernels, and imports torch only inside run()."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# The storage bench's writer: atomic, and an unwritable path is a one-line UserError rather than a traceback.
from kvport.bench.storage import _atomic_write
from kvport.errors import UserError

DIRECTIONS = ("d2h", "h2d", "d2d")
PATHS = ("dma", "staged", "zero-copy", "auto")
# Llama-3-8B: 32 layers, 8 KV heads, head_dim 128, bf16, vLLM's default block of 16 tokens. Applied to every
# catalog layout that has the dim; layouts with other dims (MLA latents) keep their own defaults for the rest.
BENCH_DIMS = {
    "layers": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "block_size": 16,
    "page_size": 16,
    "dtype": "bfloat16",
    # hybrid-swa: the 32 layers split evenly between full and sliding-window attention.
    "full_layers": 16,
    "swa_layers": 16,
}
# 8192^3 bf16 GEMM: ~1.4 ms on an H100 (1.1 TFLOP at ~800 TFLOP/s): long enough to time per launch, short
# enough that a 20 ms transfer window holds a dozen of them. A GEMM kernel holds every SM until it ends, so SM copy
# paths under this load wait up to a kernel's length; --gemm-n 2048 (27 us kernels on an H200) is closer to a
# decode step's kernels (docs/performance.md: staged 256-token chunks 0.37 under 8192, 0.89 under 2048).
GEMM_N = 8192
# Smallest --gemm-n accepted: a bound against typos (0, negative), not a measured limit.
MIN_GEMM_N = 256


def add_gemm_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gemm-n", type=int, default=GEMM_N, help=f"load: n x n x n bf16 GEMM loop (default {GEMM_N})")


def check_gemm_n(value: int) -> None:
    if value < MIN_GEMM_N:
        raise UserError(f"--gemm-n {value}: expected at least {MIN_GEMM_N}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", action="append", help="catalog layout name (repeatable; default: whole catalog)")
    parser.add_argument(
        "--tokens", type=int, action="append", help="tokens per transfer (repeatable; default 8192 256)"
    )
    parser.add_argument("--direction", choices=DIRECTIONS, action="append", help="default: d2h h2d d2d")
    parser.add_argument("--path", choices=PATHS, action="append", help="host paths (default: dma staged zero-copy)")
    parser.add_argument(
        "--load",
        choices=("gemm", "none", "engine", "engine-async"),
        action="append",
        help="default: none gemm; engine: one transfer per GEMM step on the engine's own stream, the next step "
        "after its release (vLLM's order for loads); its ratio is of latencies from the step's end, 'wait' the next "
        "step's, 'gemm' its speed; engine-async: stores the next step does not wait for (vLLM's async_stores)",
    )
    parser.add_argument("--backend", action="append", help="copy backends (default: every one available here)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=10,
        help="least timed repetitions per window (median of 3 windows of >= 40 ms reported)",
    )
    parser.add_argument(
        "--piece-mib",
        type=int,
        help="staged path: fixed pipeline piece size in MiB (default: the planner's rule, CostModel.piece_bytes_for)",
    )
    parser.add_argument("--zero-copy-programs", type=int, help="zero-copy path: CTAs/programs (default: executor's)")
    parser.add_argument(
        "--dma-batch", type=int, help="dma path: regions per cudaMemcpyBatchAsync call (0: one call per transfer)"
    )
    parser.add_argument(
        "--dma-flags", choices=("none", "overlap"), help="dma path: copy flags (overlap = PreferOverlapWithCompute)"
    )
    parser.add_argument(
        "--whole-blocks",
        action="store_true",
        help="chunks of whole engine blocks, every layer (kvport.layouts.whole_blocks): block-outer layouts only, "
        "e.g. vllm-std-blnhc, vllm-std-blhnc, vllm-std-mla-block-outer",
    )
    add_gemm_argument(parser)
    parser.add_argument("--json", type=Path, help="write device, memcpy figures and one record per case")
    parser.add_argument("--plot", type=Path, help="write a PNG of ratio to memcpy per layout and backend")


def _check_flags(args: argparse.Namespace) -> None:
    """Flag values are checked before anything touches a device, so a typo is one line on any machine."""
    for tokens in args.tokens or []:
        if tokens < 1:
            raise UserError(f"--tokens {tokens}: expected a positive token count")
    for flag, value in (("--repeat", args.repeat), ("--piece-mib", args.piece_mib)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: expected a positive number")
    check_gemm_n(args.gemm_n)
    if args.dma_batch is not None and args.dma_batch < 0:
        raise UserError(f"--dma-batch {args.dma_batch}: expected 0 (one call) or a positive region count")
    if args.zero_copy_programs is not None and args.zero_copy_programs < 1:
        raise UserError(f"--zero-copy-programs {args.zero_copy_programs}: expected a positive CTA/program count")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA/ROCm device visible to torch: the kernel benchmark needs a GPU")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib (pip install kvport[plot])") from None
    from kvport.bench._kernel_cases import Bench
    from kvport.hal.transfer.planner import CostModel

    model = CostModel()
    if args.piece_mib is not None:
        model = dataclasses.replace(model, piece_bytes=args.piece_mib << 20, min_piece_bytes=args.piece_mib << 20)
    if args.dma_batch is not None:
        model = dataclasses.replace(model, dma_batch_regions=args.dma_batch)
    if args.dma_flags is not None:
        model = dataclasses.replace(model, dma_overlap=args.dma_flags == "overlap")

    bench = Bench(
        layouts=args.layout,
        tokens=args.tokens or [8192, 256],
        directions=args.direction or list(DIRECTIONS),
        paths=args.path or ["dma", "staged", "zero-copy"],
        loads=args.load or ["none", "gemm"],
        backends=args.backend,
        repeat=args.repeat,
        dims=BENCH_DIMS,
        gemm_n=args.gemm_n,
        model=model,
        zero_copy_programs=args.zero_copy_programs,
        whole_blocks=args.whole_blocks,
    )
    print(HEADER, flush=True)

    def on_record(record: dict, partial: dict) -> None:
        # Each result as it comes, so a run cut short still leaves its numbers (stdout and the JSON file).
        from tqdm import tqdm

        tqdm.write(format_record(record), file=sys.stdout)
        sys.stdout.flush()
        if args.json is not None:
            _atomic_write(args.json, json.dumps(partial, indent=1) + "\n")

    result = bench.run(on_record)
    print(format_table(result), file=sys.stdout)
    if args.json is not None:
        _atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    return 0


HEADER = (
    f"{'layout':28} {'backend':11} {'dir':4} {'tokens':>6} {'path':10} {'used':10} {'load':12} "
    f"{'MiB':>7} {'GB/s':>8} {'ratio':>6} {'gemm':>6} {'wait ms':>8}"
)


def format_record(r: dict) -> str:
    head = f"{r['layout']:28} {r['backend']:11} {r['direction']:4} {r['tokens']:>6} {r['path']:10} "
    if r.get("error"):
        return head + f"ERROR {r['error']}"
    if r.get("skipped"):
        return head + f"skipped: {r['skipped']}"
    gemm = f"{r['gemm_ratio']:.2f}" if r.get("gemm_ratio") is not None else "-"
    # --load engine: how long the engine's next step waits for the transfer (and for a plain copy, in brackets).
    wait = f"{r['engine_wait_ms']:.3f}" if r.get("engine_wait_ms") is not None else "-"
    line = head + (
        f"{r['path_used']:10} {r['load']:12} {r['bytes'] / 2**20:7.1f} {r['gbps']:8.1f} "
        f"{r['ratio_to_memcpy']:6.3f} {gemm:>6} {wait:>8}"
    )
    if r.get("memcpy_engine_wait_ms") is not None:
        line += f" ({r['memcpy_engine_wait_ms']:.3f})"
    return line


def format_table(result: dict) -> str:
    mem = result["memcpy"]
    lines = [
        f"device: {result['device']}  torch {result['torch']}",
        "memcpy GB/s (1 GiB, back to back): " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()),
        HEADER,
    ]
    lines += [format_record(r) for r in result["records"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["records"] if "ratio_to_memcpy" in r and r["load"] == "none"]
    labels = sorted({f"{r['layout']}\n{r['direction']} {r['tokens']}" for r in rows})
    series = sorted({f"{r['backend']}/{r['path']}" for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 5))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        ys = []
        for label in labels:
            match = [
                r["ratio_to_memcpy"]
                for r in rows
                if f"{r['backend']}/{r['path']}" == name and f"{r['layout']}\n{r['direction']} {r['tokens']}" == label
            ]
            ys.append(match[0] if match else 0.0)
        ax.bar([x + i * width for x in range(len(labels))], ys, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 for x in range(len(labels))], labels, fontsize=6, rotation=90)
    ax.set_ylabel("ratio to memcpy (same bytes, same run)")
    ax.set_title(f"kvport bench kernels on {result['device']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--plot {path}: cannot write ({exc.strerror})") from None
