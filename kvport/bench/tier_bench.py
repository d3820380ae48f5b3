"""`kvport bench storage --backend redis://... | mooncake://...`: store, lookup and load of a networked tier through
the batched Tier API the cache uses, next to the raw client doing the same puts and gets in the same run.
Owns the measurement of remote tiers and their raw references; must not start servers or reach past the URL given."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from kvport.errors import UserError

# Issue 11's target: kvport's store and load at >= 90% of the raw client's throughput on the same server.
TARGET_RATIO = 0.9
FINGERPRINT = "kvport-bench-storage"


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _summary(nbytes: int, chunks: int, calls: int, seconds: float, op_lat: list[float], chunk_lat: list[float]):
    return {
        "mbps": nbytes / seconds / 1e6,
        "chunks_per_s": chunks / seconds,
        "ops_per_s": calls / seconds,
        "seconds": seconds,
        "op_p50_ms": _percentile(op_lat, 50) * 1e3,
        "op_p99_ms": _percentile(op_lat, 99) * 1e3,
        "chunk_p50_ms": _percentile(chunk_lat, 50) * 1e3,
        "chunk_p99_ms": _percentile(chunk_lat, 99) * 1e3,
    }


def run_windowed(batches: list, submit: Callable[[Any], list[cf.Future]], concurrency: int, progress) -> dict:
    """Keep ``concurrency`` batched calls in flight; per-call and per-chunk latency from submission to completion."""
    op_lat: list[float] = []
    chunk_lat: list[float] = []
    lock = threading.Lock()
    slots = threading.Semaphore(concurrency)
    outcomes: list = [None] * len(batches)
    pending: list[cf.Future] = []

    def track(index: int, futures: list[cf.Future], t0: float) -> None:
        left = [len(futures)]

        def one(_f: cf.Future) -> None:
            now = time.perf_counter()
            with lock:
                chunk_lat.append(now - t0)
                left[0] -= 1
                last = left[0] == 0
            if last:
                with lock:
                    op_lat.append(now - t0)
                outcomes[index] = [f.result() for f in futures]
                progress.update(len(futures))
                slots.release()

        for future in futures:
            future.add_done_callback(one)

    start = time.perf_counter()
    for index, batch in enumerate(batches):
        slots.acquire()
        t0 = time.perf_counter()
        futures = submit(batch)
        pending.extend(futures)
        track(index, futures, t0)
    cf.wait(pending)
    for _ in range(concurrency):  # the last callbacks have run once every slot is back
        slots.acquire()
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "op_lat": op_lat, "chunk_lat": chunk_lat, "outcomes": outcomes}


class TierBench:
    """One run against one server: kvport's tier and the raw client, interleaved round by round."""

    def __init__(self, spec: dict, args: argparse.Namespace, chunk_bytes: int) -> None:
        import torch

        from kvport.store.metrics import CacheMetrics
        from kvport.store.tiers import build_tier, check_tier_spec
        from kvport.store.tiers.remote import redact_url

        self.args = args
        self.where = f"--backend {redact_url(args.backend)}"  # never the password
        self.chunk_bytes = chunk_bytes
        self.batch = args.batch
        self.concurrency = args.concurrency
        spec = {"threads": args.concurrency, "timeout": 60, **spec}  # a benchmark measures; it does not give up
        self.spec = check_tier_spec(spec, self.where)
        self.metrics = CacheMetrics("bench-storage")
        self.tier = build_tier(self.spec, self.where, self.metrics)
        self._wait_available()
        # One registered host buffer holds every source and destination chunk, as L1 holds them in the cache.
        n_src = min(args.chunks, 8)
        n_dst = self.batch * self.concurrency
        self.memory = torch.empty((n_src + n_dst) * chunk_bytes, dtype=torch.uint8)
        self.tier.register_memory(self.memory)
        gen = torch.Generator().manual_seed(0)
        first = torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8, generator=gen)
        self.src = [self.memory[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n_src)]
        for i, view in enumerate(self.src):
            view.copy_(first.roll(i * 4099))
        base = n_src * chunk_bytes
        self.dst = [self.memory[base + i * chunk_bytes : base + (i + 1) * chunk_bytes] for i in range(n_dst)]
        self.raw = raw_client(self.tier, chunk_bytes, n_dst, self.concurrency)
        self.run_id = uuid.uuid4().hex[:8]
        self._region_lock = threading.Lock()
        self._free_regions = list(range(self.concurrency))  # destination regions, one per call in flight
        self._bad: list[str] = []  # keys whose loaded bytes differed from what was stored (--verify)

    def _wait_available(self) -> None:
        deadline = time.monotonic() + 10
        while not self.tier.available and time.monotonic() < deadline:
            self.tier.contains_prefix([])
            time.sleep(0.05)
        if not self.tier.available:
            self.tier.close()
            raise UserError(f"{self.where}: {self.tier.describe()}")

    def keys(self, round_index: int) -> list[str]:
        import hashlib

        tag = f"{self.run_id}-{round_index}"
        return [hashlib.blake2b(f"{tag}-{i}".encode(), digest_size=32).hexdigest() for i in range(self.args.chunks)]

    def batches(self, keys: list[str]) -> list[list[int]]:
        return [list(range(i, min(i + self.batch, len(keys)))) for i in range(0, len(keys), self.batch)]

    def run(self, progress_factory) -> dict:
        phases: dict[str, list] = {k: [] for k in ("raw_store", "store", "raw_load", "load")}
        lookups: dict[str, list] = {"hit": [], "miss": [], "raw_hit": [], "found": []}
        hits = total = 0
        try:
            for r in range(self.args.rounds):
                keys = self.keys(r)
                raw_keys = [f"raw:{k}" for k in keys]
                phases["raw_store"].append(self._phase("raw store", self.raw.put, raw_keys, progress_factory))
                phases["store"].append(self._phase("store", self._put, keys, progress_factory))
                phases["raw_load"].append(self._phase("raw load", self.raw.get, raw_keys, progress_factory))
                loaded = self._phase("load", self._get, keys, progress_factory)
                phases["load"].append(loaded)
                for outcome in loaded["outcomes"]:
                    total += len(outcome)
                    hits += sum(1 for result in outcome if result.value == "hit")
                self._lookups(keys, raw_keys, lookups)
                self.tier.delete(keys)
                self.raw.delete(raw_keys)
        finally:
            self.raw.close()  # first: it runs on the tier's client
            self.tier.close()
        return self._report(phases, lookups, hits, total)

    def _phase(self, label: str, submit, keys: list[str], progress_factory) -> dict:
        progress = progress_factory(len(keys), label)
        out = run_windowed([(keys, b) for b in self.batches(keys)], submit, self.concurrency, progress)
        progress.close()
        nbytes = len(keys) * self.chunk_bytes
        out["summary"] = _summary(
            nbytes, len(keys), len(out["op_lat"]), out["elapsed"], out["op_lat"], out["chunk_lat"]
        )
        return out

    # ---- kvport's side: the batched Tier API, as ChunkStore calls it -------------------------------------------
    def _put(self, item) -> list[cf.Future]:
        keys, batch = item
        return self.tier.put([keys[i] for i in batch], FINGERPRINT, [self.src[i % len(self.src)] for i in batch])

    def _get(self, item) -> list[cf.Future]:
        keys, batch = item
        region = self._take_region()
        dsts = self.dst[region * self.batch : region * self.batch + len(batch)]
        futures = self.tier.get([keys[i] for i in batch], FINGERPRINT, dsts)
        left = [len(futures)]
        lock = threading.Lock()

        def done(_f) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:  # every byte compared before the region is handed to the next call
                if self.args.verify:
                    for i, dst, f in zip(batch, dsts, futures):
                        if f.result().value == "hit" and not self._same(dst, self.src[i % len(self.src)]):
                            self._bad.append(keys[i])
                self._give_region(region)

        for f in futures:
            f.add_done_callback(done)
        return futures

    def _same(self, a, b) -> bool:
        import torch

        return bool(torch.equal(a, b))

    def _take_region(self) -> int:
        with self._region_lock:
            return self._free_regions.pop()

    def _give_region(self, region: int) -> None:
        with self._region_lock:
            self._free_regions.append(region)

    def _lookups(self, keys: list[str], raw_keys: list[str], out: dict) -> None:
        import hashlib

        probes = min(len(keys) // self.batch, self.args.lookups)
        for i in range(max(probes, 1)):
            prefix = keys[(i * self.batch) % len(keys) :][: self.batch]
            t0 = time.perf_counter()
            found = self.tier.contains_prefix(prefix)
            out["hit"].append(time.perf_counter() - t0)
            out["found"].append(found / len(prefix))  # below 1: the server evicted (or lost) stored chunks
            absent = hashlib.blake2b(f"absent-{self.run_id}-{i}".encode(), digest_size=32).hexdigest()
            t0 = time.perf_counter()
            self.tier.contains_prefix([absent])
            out["miss"].append(time.perf_counter() - t0)
            raw_prefix = raw_keys[(i * self.batch) % len(keys) :][: self.batch]
            t0 = time.perf_counter()
            self.raw.exists(raw_prefix)
            out["raw_hit"].append(time.perf_counter() - t0)

    def _report(self, phases: dict, lookups: dict, hits: int, total: int) -> dict:
        combined = {name: _combine(rounds, self.chunk_bytes) for name, rounds in phases.items()}
        out: dict[str, Any] = {
            "machine": f"{platform.node()} {os.cpu_count()} cores",
            "tier": self.tier.describe(),
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.args.chunks,
            "batch": self.batch,
            "concurrency": self.concurrency,
            "rounds": self.args.rounds,
            "verify": self.args.verify,
            "hit_rate": hits / total if total else 0.0,
            "verified_mismatches": len(self._bad) if self.args.verify else None,
            "raw": {"store": combined["raw_store"], "load": combined["raw_load"], "client": self.raw.name},
            "store": combined["store"],
            "load": combined["load"],
            "lookup": {
                "batch": self.batch,
                "hit_p50_us": _percentile(lookups["hit"], 50) * 1e6,
                "hit_p99_us": _percentile(lookups["hit"], 99) * 1e6,
                "miss_p50_us": _percentile(lookups["miss"], 50) * 1e6,
                "miss_p99_us": _percentile(lookups["miss"], 99) * 1e6,
                "raw_hit_p50_us": _percentile(lookups["raw_hit"], 50) * 1e6,
                "raw_hit_p99_us": _percentile(lookups["raw_hit"], 99) * 1e6,
                "samples": len(lookups["hit"]),
                "found_fraction": sum(lookups["found"]) / len(lookups["found"]) if lookups["found"] else 0.0,
            },
        }
        for name in ("store", "load"):
            out[name]["ratio_to_raw"] = out[name]["mbps"] / out["raw"][name]["mbps"]
            out[name]["per_round_mbps"] = [p["summary"]["mbps"] for p in phases[name]]
        out["targets"] = {
            "ratio_to_raw": TARGET_RATIO,
            "store_met": out["store"]["ratio_to_raw"] >= TARGET_RATIO,
            "load_met": out["load"]["ratio_to_raw"] >= TARGET_RATIO,
        }
        return out


def _combine(rounds: list[dict], chunk_bytes: int) -> dict:
    op_lat = [x for r in rounds for x in r["op_lat"]]
    chunk_lat = [x for r in rounds for x in r["chunk_lat"]]
    chunks = len(chunk_lat)
    seconds = sum(r["elapsed"] for r in rounds)
    return _summary(chunks * chunk_bytes, chunks, len(op_lat), seconds, op_lat, chunk_lat)


# ---- the raw clients: the same puts and gets without kvport ------------------------------------------------------
def raw_client(tier, chunk_bytes: int, n_dst: int, concurrency: int):
    if tier.kind == "redis":
        from kvport.bench.raw_clients import RawRedis

        return RawRedis(tier, chunk_bytes, concurrency)
    if tier.kind == "mooncake":
        from kvport.bench.raw_clients import RawMooncake

        return RawMooncake(tier, chunk_bytes, n_dst, concurrency)
    raise UserError(f"--backend: no raw reference for tier type {tier.kind!r}")


def run_remote(args: argparse.Namespace, spec: dict, chunk_bytes: int) -> dict:
    import sys

    from tqdm import tqdm

    def progress(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())

    bench = TierBench(spec, args, chunk_bytes)
    return bench.run(progress)


def run_cli(args: argparse.Namespace) -> int:
    """A networked tier (redis://, mooncake://) through the Tier API, against its raw client in the same run."""
    from kvport.bench.storage import _atomic_write, _chunk_bytes
    from kvport.bench.storage_report import format_remote_report, plot
    from kvport.store.tiers import spec_from_url
    from kvport.store.tiers.remote import redact_url

    if args.batch < 1 or args.concurrency < 1 or args.lookups < 1:
        raise UserError(
            f"--batch {args.batch} --concurrency {args.concurrency} --lookups {args.lookups}: expected >= 1"
        )
    chunk = _chunk_bytes(args)
    from kvport.machine import available_memory

    memory = (min(args.chunks, 8) + 2 * args.batch * args.concurrency + 1) * (chunk + 128)
    free = available_memory()
    if free is not None and 2 * memory > free:  # the client's reply copies can double it
        raise UserError(
            f"--chunk-mb {args.chunk_mb:g}: needs ~{2 * memory / 2**30:.1f} GiB of memory, "
            f"{free / 2**30:.1f} GiB is available"
        )
    spec = spec_from_url(args.backend, "--backend")
    result = run_remote(args, spec, chunk)
    result["backend"] = redact_url(args.backend)
    print(format_remote_report(result))
    if args.json is not None:
        _atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    if args.verify and result["verified_mismatches"]:
        raise UserError(f"--verify: {result['verified_mismatches']} loaded chunks differed from what was stored")
    return 0
