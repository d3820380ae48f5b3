"""`kvport bench {kernels,cache,storage,e2e}`: dispatches to kvport.bench.<name>, each owning its arguments and run().
Owns only the dispatch; benchmark modules are imported lazily so a missing optional dependency stays local."""

from __future__ import annotations

import argparse
import importlib

from kvport.errors import UserError

BENCHES = {
    "kernels": "paged engine memory <-> pinned host/device staging, every layout and backend, vs cudaMemcpy",
    "cache": "the cache engine's store and load of GPU KV through L1 vs pinned memcpy and vs the bare transfer",
    "storage": "store/lookup/load throughput and latency of a storage tier vs raw sequential I/O",
    "e2e": "time to first token with and without kvport on a real vLLM engine",
    "server": "lookup latency and store/load throughput through a kvport server process vs the in-process cache",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, help_text in BENCHES.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"kvport.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvport.bench.{name}":
                raise
            continue
        module.add_arguments(bench_parser)


def run(args: argparse.Namespace) -> int:
    if not args.bench:
        raise UserError(f"name a benchmark: {', '.join(BENCHES)}")
    try:
        module = importlib.import_module(f"kvport.bench.{args.bench}")
    except ModuleNotFoundError as exc:
        if exc.name != f"kvport.bench.{args.bench}":
            raise
        raise UserError(f"benchmark {args.bench!r} is not available in this build") from None
    return int(module.run(args) or 0)
