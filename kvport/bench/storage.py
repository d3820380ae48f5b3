"""`kvport bench storage`: store/lookup/load throughput and latency of an L2 tier next to raw sequential I/O of the
same bytes on the same path, in the same run. Owns the measurement and its report; imports torch only in run()."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

from kvport.errors import UserError

BACKENDS = ("local-disk",)
URL_SCHEMES = ("redis://", "rediss://", "unix://", "mooncake://")
# Targets from issue 5: store and load at >= 90% of raw sequential throughput; lookup p99 < 100 us at 100k chunks.
TARGET_RATIO = 0.9
TARGET_LOOKUP_P99_US = 100.0
# Payload of the index-only chunks: real, valid chunk files, small so 100k of them take seconds, not gigabytes.
INDEX_PAYLOAD = 64
LOOKUP_SAMPLES = 20000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        required=True,
        help="storage tier and location: local-disk:/mnt/nvme/kv, redis://host:6379/0, mooncake://master:50051",
    )
    # 8 MiB x 32 = 256 MiB per phase: 1.5 GiB on disk at most over 3 rounds, about a minute on the 2-core dev VM.
    # The figures in docs/performance.md used --chunk-mb 16 --chunks 64 (1 GiB per phase).
    parser.add_argument("--chunk-mb", type=float, default=8.0, help="chunk size in MiB (default 8)")
    parser.add_argument("--chunks", type=int, default=32, help="chunks stored and loaded per round (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="load threads, as the cache's io_threads (default 2)")
    parser.add_argument(
        "--write-threads", type=int, default=2, help="store threads, as the cache's l2_write_threads (default 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/tier rounds (default 3)")
    parser.add_argument("--index-chunks", type=int, default=100_000, help="chunks indexed for lookups (100000)")
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before each read phase")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark directory afterwards")
    parser.add_argument("--batch", type=int, default=4, help="remote tiers: chunks per batched call (default 4)")
    parser.add_argument("--concurrency", type=int, default=2, help="remote tiers: calls in flight (default 2)")
    parser.add_argument("--lookups", type=int, default=200, help="remote tiers: lookup samples per round (200)")
    parser.add_argument("--verify", action="store_true", help="compare every loaded byte with what was stored")
    parser.add_argument("--plot", type=Path, help="write throughput and latency as a PNG (needs matplotlib)")


def parse_backend(spec: str) -> tuple[str, Path]:
    kind, sep, where = spec.partition(":")
    if kind not in BACKENDS:
        known = ", ".join((*BACKENDS, *URL_SCHEMES))
        raise UserError(f"--backend {spec!r}: unknown storage tier {kind!r}; known: {known}")
    if not sep or not where:
        raise UserError(f"--backend {spec!r}: expected {kind}:/path/to/directory")
    return kind, Path(where)


def _check_args(args: argparse.Namespace) -> None:
    # nan and inf first: int() of them is a ValueError / OverflowError traceback.
    if not math.isfinite(args.chunk_mb) or _chunk_bytes(args) < 1:  # under one byte: empty chunks, 0 GB/s ratios
        raise UserError(f"--chunk-mb {args.chunk_mb}: expected a positive size of at least one byte")
    if args.chunks < 2:
        raise UserError(f"--chunks {args.chunks}: expected at least 2")
    if args.threads < 1 or args.write_threads < 1:
        raise UserError(f"--threads {args.threads} --write-threads {args.write_threads}: expected at least 1 each")
    if args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: expected at least 1")
    if args.index_chunks < 0:
        raise UserError(f"--index-chunks {args.index_chunks}: expected 0 or more")


def _chunk_bytes(args: argparse.Namespace) -> int:
    return int(args.chunk_mb * (1 << 20))


def _check_machine(args: argparse.Namespace, root: Path) -> None:
    """Memory for the chunk buffers and disk for every round's files, checked before anything is written: a run
    that cannot fit fails at start with the numbers, not with an allocation error or a full disk half-way."""
    from kvport.machine import available_memory, disk_space

    chunk = _chunk_bytes(args)
    # Bench holds up to 8 distinct source chunks and one destination per load thread (torch.randint into uint8 grew
    # peak RSS by 101.6 MiB for 100 MiB: no wider temporary), and writes/reads them in place.
    memory = (min(args.chunks, 8) + args.threads) * chunk
    free = available_memory()
    if free is not None and memory > free:
        raise UserError(
            f"--chunk-mb {args.chunk_mb:g}: the benchmark needs {memory / 2**30:.1f} GiB of memory for its buffers, "
            f"{free / 2**30:.1f} GiB is available"
        )
    # Each round keeps its raw file and its own chunk files until the end; index chunks take one 4 KiB block each.
    disk = args.rounds * 2 * args.chunks * chunk + args.index_chunks * 4096
    space = disk_space(root)
    if space is not None and disk > space.free:
        raise UserError(
            f"--backend {args.backend}: the benchmark writes {disk / 2**20:.1f} MiB, "
            f"{space.free / 2**20:.1f} MiB is free there"
        )


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib (pip install kvport[plot])") from None
    if args.backend.startswith(URL_SCHEMES):
        from kvport.bench.tier_bench import run_cli

        return run_cli(args)
    kind, root = parse_backend(args.backend)
    work = root / f"kvport-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        work.mkdir(parents=True)  # an existing root may still refuse a new directory (permissions, read-only)
    except OSError as exc:
        raise UserError(f"--backend {args.backend}: cannot create {work} ({exc.strerror})") from None
    try:
        _check_machine(args, work)
        chunk = _chunk_bytes(args)
        _say(
            f"kvport bench storage: {args.rounds} round(s) of {args.chunks} chunks of {_mib(chunk)} MiB under {work} "
            f"(writes {_mib(args.rounds * 2 * args.chunks * chunk)} MiB, kept until the end), then "
            f"{args.index_chunks} index chunks for lookups"
        )
        result = Bench(work, args).run()
    except OSError as exc:  # the disk filled up or the directory became unwritable during the run
        raise UserError(f"--backend {args.backend}: I/O error under {work}: {exc.strerror or exc}") from None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["backend"] = args.backend
    print(format_report(result))
    if args.json is not None:
        _atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        from kvport.bench.storage_report import plot_disk

        plot_disk(result, args.plot)
    return 0


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        import torch

        from kvport.store.tiers.local_disk import LocalDiskTier

        self.work = work
        self.args = args
        self.chunk_bytes = _chunk_bytes(args)
        self.total = self.chunk_bytes * args.chunks
        # Capacity far above what the run writes: eviction is measured by the tests, not here.
        self.tier = LocalDiskTier(
            work / "l2", capacity_bytes=1 << 50, read_threads=args.threads, write_threads=args.write_threads
        )
        # A failed store ends the run with one line of its own: the tier's warnings (disk full...) would repeat it.
        logging.getLogger("kvport.store").setLevel(logging.ERROR)
        gen = torch.Generator().manual_seed(0)
        # Random bytes, as KV is incompressible; one buffer per chunk so threads never share one.
        self.src = [torch.randint(0, 256, (self.chunk_bytes,), dtype=torch.uint8, generator=gen)]
        self.src += [self.src[0].roll(i * 4099) for i in range(1, min(args.chunks, 8))]
        self.dst = [torch.empty(self.chunk_bytes, dtype=torch.uint8) for _ in range(args.threads)]
        self.keys = [hashlib.blake2b(b"bench-%d" % i, digest_size=32).hexdigest() for i in range(args.chunks)]
        self.fingerprint = "kvport-bench-storage"

    def run(self) -> dict:
        from kvport.hal.platform import detect_platform

        info = detect_platform()
        out = {
            "machine": f"{platform.node()} {os.cpu_count()} cores, platform {info.name}",
            "chunk_bytes": self.chunk_bytes,
            "chunks": self.args.chunks,
            "total_bytes": self.total,
            "threads": self.args.threads,
            "write_threads": self.args.write_threads,
            "rounds": self.args.rounds,
            "cold": self.args.cold,
            "verify": self.args.verify,
        }
        # Rounds interleave raw and tier phases (raw write, store, raw read, load) so both see the same disk and
        # page-cache state; this VM's throughput drifts by 2x within a minute (writeback, memory reclaim).
        phases: dict[str, list] = {"raw_write": [], "raw_read": [], "store": [], "load": []}
        for r in range(self.args.rounds):
            keys = [f"{r:02x}{k[2:]}" for k in self.keys]
            # One raw file per round, deleted with the rest at the end: this VM's ext4 is mounted with online
            # discard, and deleting 1 GiB between phases slowed the next phase's writes.
            raw_path = self.work / f"raw-{r}.bin"
            phases["raw_write"].append(self.raw_write(raw_path))
            phases["store"].append(self.store(keys))
            phases["raw_read"].append(self.raw_read(raw_path))
            phases["load"].append(self.load(keys))
            figures = ", ".join(f"{name} {phases[name][-1]['gbps']:.2f}" for name in phases)
            _say(f"round {r + 1}/{self.args.rounds} (GB/s): {figures}")
        raw_write = _combine(phases["raw_write"])
        raw_read = _combine(phases["raw_read"])
        out["raw"] = {
            "write_gbps": raw_write["gbps"],
            "read_gbps": raw_read["gbps"],
            "write_p50_ms": raw_write["p50_ms"],
            "write_p99_ms": raw_write["p99_ms"],
            "read_p50_ms": raw_read["p50_ms"],
            "read_p99_ms": raw_read["p99_ms"],
        }
        out["raw"]["per_round"] = {
            "write_gbps": [p["gbps"] for p in phases["raw_write"]],
            "read_gbps": [p["gbps"] for p in phases["raw_read"]],
        }
        for name, raw in (("store", raw_write), ("load", raw_read)):
            out[name] = _combine(phases[name])
            out[name]["ratio_to_raw"] = out[name]["gbps"] / raw["gbps"]
            out[name]["per_round_gbps"] = [p["gbps"] for p in phases[name]]
        out["lookup"] = self.lookup()
        out["targets"] = {
            "ratio_to_raw": TARGET_RATIO,
            "lookup_p99_us": TARGET_LOOKUP_P99_US,
            "store_met": out["store"]["ratio_to_raw"] >= TARGET_RATIO,
            "load_met": out["load"]["ratio_to_raw"] >= TARGET_RATIO,
            "lookup_met": out["lookup"]["hit_p99_us"] < TARGET_LOOKUP_P99_US,
        }
        return out

    # ---- raw sequential I/O of the same bytes on the same file system --------------------------------------
    def raw_write(self, path: Path) -> dict:
        from kvport.store.tiers.local_disk import write_all  # the tier's own write loop: only its overhead differs

        progress = _progress(self.args.chunks, "raw write")
        latencies = []
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(self.args.chunks):
                t0 = time.perf_counter()
                write_all(fd, [memoryview(self.src[i % len(self.src)].numpy())])
                latencies.append(time.perf_counter() - t0)
                progress.update()
        finally:
            os.close(fd)
        _sync()  # on the medium, as the store phase
        progress.close()
        return _summary(self.total, time.perf_counter() - start, latencies)

    def raw_read(self, path: Path) -> dict:
        if self.args.cold:
            _drop_cache([path])
        progress = _progress(self.args.chunks, "raw read")
        view = memoryview(self.dst[0].numpy())
        latencies = []
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(self.args.chunks):
                t0 = time.perf_counter()
                done = 0
                while done < self.chunk_bytes:
                    done += os.preadv(fd, [view[done:]], i * self.chunk_bytes + done)
                latencies.append(time.perf_counter() - t0)
                progress.update()
        finally:
            os.close(fd)
        progress.close()
        return _summary(self.total, time.perf_counter() - start, latencies)

    # ---- the tier --------------------------------------------------------------------------------------------
    def store(self, keys: list[str]) -> dict:
        """The tier's batched put, as ChunkStore calls it, ``write_threads`` calls in flight (one chunk each)."""
        from kvport.bench.tier_bench import run_windowed

        progress = _progress(self.args.chunks, "store")

        def submit(i: int):
            return self.tier.put([keys[i]], self.fingerprint, [self.src[i % len(self.src)]])

        out = run_windowed(list(range(self.args.chunks)), submit, self.args.write_threads, progress)
        for i, stored in enumerate(out["outcomes"]):
            if not stored[0]:
                raise UserError(f"--backend {self.args.backend}: {self._put_failed(i)}")
        start = time.perf_counter()
        _sync()  # same durability point as the raw phase
        elapsed = out["elapsed"] + time.perf_counter() - start
        progress.close()
        return _summary(self.total, elapsed, out["chunk_lat"])

    def _put_failed(self, i: int) -> str:
        """Why a tier put failed, as far as the filesystem says (the tier only answers False)."""
        from kvport.machine import disk_space

        space = disk_space(self.work)
        full = space is not None and space.free < self.chunk_bytes
        why = "the disk is full" if full else "disk full, out of inodes or not writable"
        return f"store of chunk {i} failed under {self.work} ({why})"

    def load(self, keys: list[str]) -> dict:
        """The tier's batched get, ``threads`` calls in flight (one chunk each, each into its own buffer)."""
        from kvport.bench.tier_bench import run_windowed

        if self.args.cold:
            _drop_cache([self.tier.path(k) for k in keys])
        progress = _progress(self.args.chunks, "load")
        free = list(range(len(self.dst)))
        lock = threading.Lock()
        bad: list[str] = []

        def submit(i: int):
            with lock:
                slot = free.pop()
            dst = self.dst[slot]
            future = self.tier.get([keys[i]], self.fingerprint, [dst])[0]

            def done(f) -> None:
                result = f.result()
                if result.value != "hit":
                    bad.append(f"load of chunk {i}: {result.value}")
                elif self.args.verify and not torch_equal(dst, self.src[i % len(self.src)]):
                    bad.append(f"load of chunk {i}: bytes differ from what was stored")
                with lock:
                    free.append(slot)

            future.add_done_callback(done)
            return [future]

        out = run_windowed(list(range(self.args.chunks)), submit, self.args.threads, progress)
        progress.close()
        if bad:
            raise UserError(f"--backend {self.args.backend}: {bad[0]}")
        return _summary(self.total, out["elapsed"], out["chunk_lat"])

    def lookup(self) -> dict:
        """Latency of CacheEngine.lookup for a one-chunk prefix (key derivation + tier check), hits and misses,
        with ``--index-chunks`` valid chunk files in the same directory tree."""
        import torch

        from kvport.cache import CacheEngine, load_config
        from kvport.store.keys import chunk_keys

        chunk_tokens = 256
        n = self.args.index_chunks
        payload = torch.zeros(INDEX_PAYLOAD, dtype=torch.uint8)
        progress = _progress(n, "index chunks")
        token_sets = []
        if n:
            _say(f"writing {n} index chunks (one small file each) for the lookup figures")
        for i in range(n):
            if i and i % (n // 4 or 1) == 0:
                _say(f"  {i}/{n} index chunks")
            tokens = [i, *range(chunk_tokens - 1)]
            key = chunk_keys(tokens, chunk_tokens, "bench-lookup")[0]
            if not self.tier.put_one(key, self.fingerprint, payload):
                raise UserError(f"--backend {self.args.backend}: index {self._put_failed(i)}")
            if i < LOOKUP_SAMPLES:
                token_sets.append(tokens)
            progress.update()
        progress.close()
        cfg = load_config(overrides={"chunk_tokens": chunk_tokens, "l2_path": str(self.work / "l2")}, environ={})
        engine = CacheEngine(cfg, "bench-lookup")
        samples = token_sets or [[0] * chunk_tokens]
        hits, misses = [], []
        for i in range(min(LOOKUP_SAMPLES, max(n, 1000))):
            tokens = samples[(i * 7919) % len(samples)]  # strided order: not the creation order
            if n:
                t0 = time.perf_counter()
                found = engine.lookup(tokens)
                hits.append(time.perf_counter() - t0)
                if found != chunk_tokens:
                    raise RuntimeError("an indexed chunk was not found by lookup")
            t0 = time.perf_counter()
            engine.lookup([-1 - i, *range(chunk_tokens - 1)])
            misses.append(time.perf_counter() - t0)
        engine.close()
        pct = lambda xs, q: _percentile(xs, q) * 1e6 if xs else float("nan")  # noqa: E731
        return {
            "indexed_chunks": n,
            "samples": len(misses),
            "hit_p50_us": pct(hits, 50),
            "hit_p99_us": pct(hits, 99),
            "miss_p50_us": pct(misses, 50),
            "miss_p99_us": pct(misses, 99),
        }


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _summary(total: int, elapsed: float, latencies: list[float]) -> dict:
    return {
        "gbps": total / elapsed / 1e9,
        "bytes": total,
        "seconds": elapsed,
        "latencies": latencies,
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "p99_ms": _percentile(latencies, 99) * 1e3,
    }


def _combine(rounds: list[dict]) -> dict:
    """All rounds as one: total bytes over total seconds, percentiles over every operation."""
    latencies = [x for r in rounds for x in r["latencies"]]
    out = _summary(sum(r["bytes"] for r in rounds), sum(r["seconds"] for r in rounds), latencies)
    del out["latencies"]
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def _sync() -> None:
    """One durability barrier that ends both write phases alike: a single fsync of the raw file against one
    fsync per chunk file would charge the tier for 64 journal commits the cache itself never asks for
    (l2_fsync is off by default), so both phases end with the same sync(2) instead."""
    os.sync()


def _drop_cache(paths: list[Path]) -> None:
    """Evict clean pages of these files from the page cache (no root needed), so reads hit the medium."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _say(line: str) -> None:
    """A progress line on stderr (the report goes to stdout), also when stderr is not a terminal."""
    print(line, file=sys.stderr, flush=True)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:g}"


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())


def format_report(r: dict) -> str:
    s, ld, lk = r["store"], r["load"], r["lookup"]
    mib = r["chunk_bytes"] / (1 << 20)
    lines = [
        f"storage: {r['backend']}  {r['chunks']} chunks x {mib:g} MiB x {r['rounds']} rounds, "
        f"{r['write_threads']} store / {r['threads']} load threads"
        + (", cold page cache" if r["cold"] else ", warm page cache")
        + (", every byte verified" if r.get("verify") else ""),
        f"machine: {r['machine']}",
        f"raw sequential   write {r['raw']['write_gbps']:.3f} GB/s   read {r['raw']['read_gbps']:.3f} GB/s",
        f"store  {s['gbps']:.3f} GB/s  ratio {s['ratio_to_raw']:.2f}  p50 {s['p50_ms']:.2f} ms  "
        f"p99 {s['p99_ms']:.2f} ms",
        f"load   {ld['gbps']:.3f} GB/s  ratio {ld['ratio_to_raw']:.2f}  p50 {ld['p50_ms']:.2f} ms  "
        f"p99 {ld['p99_ms']:.2f} ms",
        f"lookup ({lk['indexed_chunks']} chunks indexed)  hit p50 {lk['hit_p50_us']:.1f} us  "
        f"p99 {lk['hit_p99_us']:.1f} us   miss p50 {lk['miss_p50_us']:.1f} us  p99 {lk['miss_p99_us']:.1f} us",
    ]
    t = r["targets"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines.append(
        f"targets: store >= {t['ratio_to_raw']:.0%} of raw {verdict(t['store_met'])}, load {verdict(t['load_met'])}, "
        f"lookup p99 < {t['lookup_p99_us']:.0f} us {verdict(t['lookup_met'])}"
    )
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--json {path}: cannot write ({exc.strerror})") from None
