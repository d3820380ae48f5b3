"""`kvport bench cache`: the cache engine's own store and load (L1, GPU KV) vs pinned memcpy and vs the bare transfer.
Owns the cache cases and their table; must not time anything but CacheEngine's public calls and, as the reference,
the same Transfer the engine's mover runs (measurement helpers come from kvport.bench._kernel_cases)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from kvport.bench.kernels import BENCH_DIMS, add_gemm_argument, check_gemm_n
from kvport.bench.storage import _atomic_write
from kvport.errors import UserError

DEFAULT_LAYOUTS = ("vllm-flash-nhd", "vllm-flash-hnd", "vllm-mla")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", action="append", help=f"catalog layout (repeatable; default {DEFAULT_LAYOUTS})")
    parser.add_argument("--tokens", type=int, action="append", help="tokens per store/load (default 8192 256)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="cache chunk size in tokens (default 256)")
    parser.add_argument("--load", choices=("gemm", "none"), action="append", help="default: none gemm")
    parser.add_argument("--repeat", type=int, default=10, help="least timed repetitions per case")
    add_gemm_argument(parser)
    parser.add_argument("--json", type=Path, help="write device, memcpy figures and one record per case")


def run(args: argparse.Namespace) -> int:
    for tokens in args.tokens or []:
        if tokens < args.chunk_tokens or tokens % args.chunk_tokens:
            raise UserError(f"--tokens {tokens}: expected a positive multiple of --chunk-tokens {args.chunk_tokens}")
    if args.repeat < 1 or args.chunk_tokens < 1:
        raise UserError("--repeat and --chunk-tokens must be positive")
    check_gemm_n(args.gemm_n)
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA/ROCm device visible to torch: the cache benchmark needs a GPU")
    from kvport.bench._kernel_cases import Bench

    bench = Bench(
        layouts=None,
        tokens=[],
        directions=[],
        paths=[],
        loads=args.load or ["none", "gemm"],
        backends=None,
        repeat=args.repeat,
        dims=BENCH_DIMS,
        gemm_n=args.gemm_n,
    )
    records = []
    print(HEADER, flush=True)
    for layout in args.layout or DEFAULT_LAYOUTS:
        for tokens in args.tokens or [8192, 256]:
            for record in _cases(bench, layout, tokens, args):
                records.append(record)
                print(format_record(record), flush=True)
                if args.json is not None:
                    _atomic_write(args.json, json.dumps(_summary(bench, records), indent=1) + "\n")
    if args.json is not None:
        _atomic_write(args.json, json.dumps(_summary(bench, records), indent=1) + "\n")
    return 0


def _summary(bench, records) -> dict:
    import torch

    return {
        "device": torch.cuda.get_device_name(bench.device),
        "torch": torch.__version__,
        "memcpy": {"d2h_gbps": bench.memcpy_gbps("d2h", 1 << 30), "h2d_gbps": bench.memcpy_gbps("h2d", 1 << 30)},
        "records": records,
    }


def _cases(bench, layout: str, tokens: int, args):
    """Store and load of ``tokens`` through a CacheEngine bound to GPU KV, L1 only, each alone and under load, with
    the bare transfer of the same chunks (the mover's Transfer.move, same path) as the reference."""
    import torch

    from kvport.bench._kernel_cases import sized_layout
    from kvport.cache import CacheEngine, load_config
    from kvport.layouts import allocate

    spec = sized_layout(layout, BENCH_DIMS)
    chunk = args.chunk_tokens
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    num_blocks = [2 * n + 2 for n in need]
    kv = allocate(spec, num_blocks if len(num_blocks) > 1 else num_blocks[0], device=bench.device, fill="zeros")
    for storage in kv.storages:
        storage.random_(0, 256)
    rng = random.Random(0)
    ids = [rng.sample(range(nb), n) for nb, n in zip(num_blocks, need)]
    nbytes = kv.descriptor.canonical_bytes(tokens)
    chunks = tokens // chunk
    slot = -(-kv.descriptor.canonical_bytes(chunk) // 4096) * 4096
    # As an engine stores after each step: at most a few stores in flight (the host runs ahead of the device), up to
    # 4 GiB of them (three 8K-token Llama stores, sixteen 256-token ones); L1 holds those plus the loaded prefix, so
    # no store ever finds L1 full and stores less. LRU recycles older stores' slots.
    max_in_flight = max(3, min(16, (4 << 30) // (chunks * slot)))
    l1_bytes = max((max_in_flight + 2) * chunks * slot, 64 << 20)
    cfg = load_config(overrides={"chunk_tokens": chunk, "l1_bytes": l1_bytes}, environ={})
    engine = CacheEngine(cfg, f"bench-cache-{layout}")
    engine.bind(kv.descriptor)
    mover = engine.mover
    counter = [0]
    in_flight: list = []

    def store_once():
        counter[0] += 1  # new keys every time
        while len(in_flight) >= max_in_flight:
            in_flight.pop(0).wait()
        ticket = engine.submit_store([counter[0], *range(tokens - 1)], ids, tokens)
        if ticket.tokens != tokens:
            raise RuntimeError(f"store moved {ticket.tokens} of {tokens} tokens (L1 full?)")
        ticket.completion.wait_on()
        in_flight.append(ticket)
        return ticket.completion

    prefix = list(range(tokens))
    assert engine.store(prefix, ids, tokens) == tokens
    leases = [engine.l1.acquire(k) for k in engine.chunk_keys(prefix)]
    tables = [engine.chunk_tables(engine.descriptor.normalize_block_ids(ids), i) for i in range(chunks)]
    bufs = [lease.buffer for lease in leases]

    def load_once():
        ticket = engine.submit_load(prefix, ids, tokens)
        if ticket.tokens != tokens:
            raise RuntimeError(f"load moved {ticket.tokens} of {tokens} tokens")
        ticket.completion.wait_on()
        return ticket.completion

    def bare(direction):
        def once():
            chunks_ = list(zip(tables, bufs))
            completion = mover.transfer.move(direction, mover.descriptor, chunks_, chunk, mover.path).completion
            completion.wait_on()  # as the cache's own tickets are waited on
            return completion

        return once

    try:
        for op, direction, fn in (("store", "d2h", store_once), ("load", "h2d", load_once)):
            path = mover.path_for(direction, chunk, chunks)
            for load in args.load or ["none", "gemm"]:
                row = {"layout": layout, "tokens": tokens, "op": op, "path": path, "load": load, "bytes": nbytes}
                limit = bench.memcpy_gbps(direction, nbytes)
                for name, issue in (("transfer", bare(direction)), ("cache", fn)):
                    if load == "gemm":
                        ms, gemm = bench._under_load(issue)
                    else:
                        one = bench._time(issue, 2)
                        ms, gemm = bench._time(issue, bench._reps(one)), None
                    torch.cuda.synchronize()
                    while in_flight:
                        in_flight.pop(0).wait()
                    row[f"{name}_ratio"] = nbytes / ms / 1e6 / limit
                    row[f"{name}_gemm"] = gemm
                row["memcpy_gbps"] = limit
                row["cache_vs_transfer"] = row["cache_ratio"] / row["transfer_ratio"]
                if load == "gemm":
                    row["step_ms"], row["step_added_ms"], row["host_ms"] = _step_cost(bench, fn)
                else:
                    row["stream_wait_ms"] = _stream_wait(fn)
                while in_flight:
                    in_flight.pop(0).wait()
                yield row
    finally:
        for lease in leases:
            lease.release()
        engine.close()
        del kv
        torch.cuda.empty_cache()


def _step_cost(bench, issue) -> tuple[float, float, float]:
    """What one cache operation adds to a forward step it overlaps: a step of GEMMs (about 20 ms, like a prefill
    step of a mid-size model) on its own stream, timed alone and with the operation issued as the step starts, and
    the calling thread's time in that one call (the engine's own thread pays it; measured here, with no other
    transfer in flight, rather than in the throughput loops, where it includes waiting for a free slot).
    Returns (step ms alone, ms added, host ms of the call), medians of five."""
    import statistics
    import time

    import torch

    n = max(1, round(20.0 / (bench.gemm_solo_ms() * bench.gemms_per_step)))  # load steps of ~20 ms in all
    step_stream = torch.cuda.Stream(bench.device)
    host: list[float] = []

    def step(with_op: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        step_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(step_stream):
            start.record()
            for _ in range(n):
                bench.load_step()
            end.record()
        if with_op:
            began = time.perf_counter()
            issue()
            host.append(time.perf_counter() - began)
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    step(True)
    host.clear()
    alone = statistics.median(step(False) for _ in range(5))
    loaded = statistics.median(step(True) for _ in range(5))
    return alone, loaded - alone, statistics.median(host) * 1e3


def _stream_wait(issue) -> float:
    """How long the engine's own stream waits for one cache operation when it is ordered after it, as the vLLM
    worker does (issued after the forward on the current stream, ``wait_on`` before the next): ms from the operation's
    issue to when the stream's next kernel may start, median of five, nothing else in flight. A store holds the
    stream until its gather read the blocks, a load until its scatter wrote them."""
    import statistics

    import torch

    waits = []
    for _ in range(6):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        issue()
        end.record()
        end.synchronize()
        waits.append(begin.elapsed_time(end))
    return statistics.median(waits[1:])


HEADER = (
    f"{'layout':16} {'tokens':>6} {'op':5} {'path':9} {'load':5} {'MiB':>7} {'transfer':>8} {'(gemm)':>6} "
    f"{'cache':>6} {'(gemm)':>6} {'cache/xfer':>10} {'step +ms':>9} {'host ms':>8} {'wait ms':>8}"
)


def format_record(r: dict) -> str:
    def gemm(v):
        return f"{v:6.2f}" if v is not None else f"{'-':>6}"

    return (
        f"{r['layout']:16} {r['tokens']:>6} {r['op']:5} {r['path']:9} {r['load']:5} {r['bytes'] / 2**20:7.1f} "
        f"{r['transfer_ratio']:8.3f} {gemm(r['transfer_gemm'])} {r['cache_ratio']:6.3f} {gemm(r['cache_gemm'])} "
        f"{r['cache_vs_transfer']:10.3f} "
        + (
            f"{r['step_added_ms']:9.3f} {r['host_ms']:8.3f}"
            if r.get("step_added_ms") is not None
            else f"{'-':>9} {'-':>8}"
        )
        + (f" {r['stream_wait_ms']:8.3f}" if r.get("stream_wait_ms") is not None else f" {'-':>8}")
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.ArgumentParser().parse_args()))
