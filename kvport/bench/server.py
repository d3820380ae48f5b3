"""`kvport bench server`: a real `kvport server` process vs the in-process cache on the same KV memory: scheduler-side
lookup latency of a long prompt over the socket, and store/load throughput through the shared L1. Owns these cases
and their table; must not time anything but the caches' public calls (the server runs as its own process)."""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvport.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout", default="vllm-flash-nhd", help="catalog layout of the engine KV (default %(default)s)"
    )
    parser.add_argument("--layers", type=int, help="layers (default 32 on a GPU, 8 on CPU)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per store/load (default %(default)s)")
    parser.add_argument("--lookup-tokens", type=int, default=131072, help="prompt length for lookups (default 128K)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="cache chunk size (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=10, help="timed stores and loads per cache (default %(default)s)")
    parser.add_argument("--lookups", type=int, default=500, help="timed lookups per case (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="KV device (default: cuda when present)")
    parser.add_argument("--address", help="server address (default: an ipc socket in a temp dir); tcp://127.0.0.1:N")
    parser.add_argument("--json", type=Path, help="write the results")


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("tokens", "lookup_tokens"):
        value = getattr(args, name)
        if value < args.chunk_tokens or value % args.chunk_tokens:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a multiple of --chunk-tokens")
    if args.repeat < 1 or args.lookups < 1:
        raise UserError("--repeat and --lookups must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA/ROCm device visible to torch")
    layers = args.layers or (32 if device == "cuda" else 8)
    from kvport.server.spawn import ServerProcess

    with tempfile.TemporaryDirectory(prefix="kvport-bench-server-") as work:
        address = args.address or f"ipc://{work}/bench.sock"
        result = {"device": _device_name(device), "layout": args.layout, "layers": layers, "address": address}
        # Lookups need many chunks, not big ones: a one-layer, one-head KV of 16 KiB chunks on its own server.
        tiny = _engine_kv(args.layout, {"layers": 1, "kv_heads": 1, "head_dim": 16}, args.tokens, device)
        lookup_chunks = args.lookup_tokens // args.chunk_tokens
        l1_bytes = 2 * lookup_chunks * (tiny.descriptor.canonical_bytes(args.chunk_tokens) + 4096)
        with ServerProcess(work, {"address": address}, {"l1_bytes": l1_bytes}):
            result["lookup"] = _lookups(args, tiny, address, l1_bytes)
        del tiny
        kv = _engine_kv(args.layout, {"layers": layers}, args.tokens, device)
        chunk_bytes = kv.descriptor.canonical_bytes(args.chunk_tokens)
        # A loaded prefix plus stores of fresh keys that LRU recycles.
        l1_bytes = 4 * (args.tokens // args.chunk_tokens) * (chunk_bytes + 4096)
        result |= {"chunk_bytes": chunk_bytes, "tokens": args.tokens, "lookup_tokens": args.lookup_tokens}
        with ServerProcess(work, {"address": address}, {"l1_bytes": l1_bytes}):
            result["throughput"] = _throughput(args, kv, address, l1_bytes)
    for line in _table(result):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _engine_kv(layout: str, dims: dict, tokens: int, device: str):
    from kvport.bench.kernels import BENCH_DIMS
    from kvport.layouts import allocate, load_layout

    spec = load_layout(layout)
    dims = {k: v for k, v in {**BENCH_DIMS, **dims}.items() if k in dict(spec.dims)}
    spec = load_layout(layout, **dims)
    blocks = -(-tokens // spec.groups[0].tokens_per_block)
    return allocate(spec, blocks + 2, device=device, fill="random")


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _config(address: str | None, args, l1_bytes: int):
    from kvport.cache.config import load_config

    overrides = {"chunk_tokens": args.chunk_tokens, "l1_bytes": l1_bytes}
    return load_config(overrides=overrides | ({"server": address} if address else {}), environ={})


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "n": len(ordered),
    }


def _timed(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _lookups(args, kv, address: str, l1_bytes: int) -> dict:
    """A prompt of --lookup-tokens stored whole (its chunks gathered from the same blocks again and again), then
    looked up as vLLM's scheduler does: the same prompt list each step (keys derived once, then cached), a fresh
    request with the same tokens (derive + ask), and the key derivation alone for comparison."""
    from kvport.cache import CacheEngine
    from kvport.server.remote import RemoteCache
    from kvport.store.keys import chunk_keys

    ct, n = args.chunk_tokens, args.tokens
    prompt = list(range(7, 7 + args.lookup_tokens))
    blocks_per_chunk = ct // kv.descriptor.groups[0].tokens_per_block
    writer = RemoteCache(_config(address, args, l1_bytes), "bench-lookup")
    writer.bind(kv.descriptor)
    local = CacheEngine(_config(None, args, l1_bytes), "bench-lookup")
    local.bind(kv.descriptor)
    for start in range(0, len(prompt), n):  # n tokens per store: the blocks hold n tokens
        ids = list(range(n // ct * blocks_per_chunk))
        for cache in (writer, local):
            cache.store(prompt[: start + n], ids * (start // n + 1), start + n, skip_tokens=start)
    scheduler = RemoteCache(_config(address, args, l1_bytes), "bench-lookup")
    miss = [1, *prompt[1:]]
    want = len(prompt)
    if scheduler.lookup(prompt) != want or local.lookup(prompt) != want:
        raise RuntimeError("lookup bench: the stored prompt is not a full hit")
    few = max(50, args.lookups // 5)
    # Equal lists of other int objects, as a worker gets its tokens from the scheduler (pickled); a few, reused: each
    # is compared in full with the cached copy (128K tokens of distinct ints are ~4 MB each).
    next_copy = itertools.cycle([pickle.loads(pickle.dumps(prompt)) for _ in range(8)]).__next__
    keys = scheduler.keys

    def derived():
        keys.clear()  # a prompt this process never saw: its keys are derived
        return scheduler.lookup(prompt)

    out = {
        "cached_keys": _percentiles(_timed(lambda: scheduler.lookup(prompt), args.lookups)),
        "equal_copy": _percentiles(_timed(lambda: scheduler.lookup(next_copy()), few)),
        "fresh_request": _percentiles(_timed(derived, few)),
        "derive_keys_only": _percentiles(_timed(lambda: chunk_keys(prompt, ct, "bench-lookup"), few)),
        "in_process_l1": _percentiles(_timed(lambda: local.lookup(prompt), few)),
        "miss": _percentiles(_timed(lambda: scheduler.lookup(miss), args.lookups)),
        "chunks": len(prompt) // ct,
    }
    for cache in (scheduler, writer, local):
        cache.close()
    return out


def _throughput(args, kv, address: str, l1_bytes: int) -> dict:
    """Store (fresh keys each time, as an engine stores new prompts) and load (a stored prefix) of --tokens through
    each cache, with the same descriptor and backend; GB/s of canonical chunk bytes, medians of --repeat runs. The
    two caches take turns run by run, so a neighbour's load on a shared machine hits both alike."""
    from kvport.cache import CacheEngine
    from kvport.server.remote import RemoteCache

    n = args.tokens
    nbytes = kv.descriptor.canonical_bytes(n)
    ids = list(range(n // kv.descriptor.groups[0].tokens_per_block))
    caches = {
        "in_process": CacheEngine(_config(None, args, l1_bytes), "bench-xfer-local"),
        "server": RemoteCache(_config(address, args, l1_bytes), "bench-xfer-server"),
    }
    prefix = list(range(3, 3 + n))
    counter = [0]

    def store_once(cache):
        counter[0] += 1
        if cache.store([counter[0] * 10**7, *range(n - 1)], ids, n) != n:
            raise RuntimeError(f"store moved less than {n} tokens (L1 full?)")
        _sync(kv)

    def load_once(cache):
        if cache.load(prefix, ids, n) != n:
            raise RuntimeError(f"load moved less than {n} tokens")
        _sync(kv)

    times: dict[tuple[str, str], list[float]] = {}
    for cache in caches.values():
        cache.bind(kv.descriptor)
        cache.store(prefix, ids, n)
    # Loads first: the stores' fresh chunks push the prefix out of L1 (LRU) once they outnumber its slots.
    for op, fn in (("load", load_once), ("store", store_once)):
        for cache in caches.values():
            fn(cache)  # warm-up: first touch of pages, backend set-up
        for _ in range(args.repeat):
            for name, cache in caches.items():
                times.setdefault((name, op), []).extend(_timed(lambda c=cache, f=fn: f(c), 1))
    out: dict = {"bytes": nbytes}
    for name in caches:
        out[name] = {f"{op}_gbps": nbytes / statistics.median(times[(name, op)]) / 1e9 for op in ("store", "load")}
    out["server"]["staged"] = caches["server"].stats()["server"]["staged"]
    for cache in caches.values():
        cache.close()
    for op in ("store", "load"):
        out[f"{op}_ratio"] = out["server"][f"{op}_gbps"] / out["in_process"][f"{op}_gbps"]
    return out


def _sync(kv) -> None:
    device = kv.descriptor.streams[0].buffer.device
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _table(r: dict) -> list[str]:
    lk, tp = r["lookup"], r["throughput"]
    lines = [
        f"kvport bench server: {r['device']}, layout {r['layout']} x {r['layers']} layers, "
        f"{r['chunk_bytes'] / 2**20:.2f} MiB per chunk, server at {r['address']}",
        f"lookup of a {r['lookup_tokens']}-token prompt ({lk['chunks']} chunks, full hit):",
    ]
    for case, what in (
        ("cached_keys", "through the server, same prompt list (keys cached)"),
        ("equal_copy", "through the server, equal copy of the prompt (keys cached)"),
        ("fresh_request", "through the server, keys derived (prompt never seen)"),
        ("derive_keys_only", "key derivation alone"),
        ("in_process_l1", "in-process cache, L1 (reference)"),
        ("miss", "through the server, miss at the first chunk (keys cached)"),
    ):
        p = lk[case]
        lines.append(f"  {what:55} p50 {p['p50_ms']:7.3f} ms  p99 {p['p99_ms']:7.3f} ms  (n={p['n']})")
    lines.append(f"store/load of {r['tokens']} tokens ({tp['bytes'] / 2**20:.1f} MiB):")
    for op in ("store", "load"):
        local, remote = tp["in_process"][f"{op}_gbps"], tp["server"][f"{op}_gbps"]
        lines.append(
            f"  {op:5} in-process {local:7.2f} GB/s   server {remote:7.2f} GB/s   ratio {tp[f'{op}_ratio']:.3f}"
        )
    return lines


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.ArgumentParser().parse_args()))
