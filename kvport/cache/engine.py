"""The cache engine: longest-prefix lookup, load (scatter into engine blocks) and store (gather out of them)
over the L1 pool and an optional L2 tier. Owns the data path's policy; must not know engines or kernel code."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvport.cache.config import CacheConfig
from kvport.cache.keys import iter_chunk_keys
from kvport.cache.l1 import L1Pool, Lease
from kvport.cache.l2.base import ReadResult
from kvport.cache.metrics import CacheMetrics, serve_metrics
from kvport.cache.pipeline import BoundedSubmitter, Handle, fetch_in_order
from kvport.errors import UserError

if TYPE_CHECKING:
    import torch

    from kvport.cache.l2.base import L2Tier
    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor

_log = logging.getLogger("kvport.cache")
_NO_SLOT = object()  # a fetch that found the chunk in L2 but had no free L1 slot to read it into
# Longest wait for a chunk another thread is reading into L1 (one chunk read takes milliseconds).
_FILL_WAIT_S = 1.0


def _metrics_label(namespace: str) -> str:
    if len(namespace) <= 64:
        return namespace
    return namespace[:40] + "~" + hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()


class CacheEngine:
    """One model shard's cache. Scheduler-side processes use ``lookup`` only (L2 by config + namespace);
    worker-side processes ``bind`` the engine's copy descriptor, then ``load``/``store``."""

    def __init__(self, config: CacheConfig, namespace: str) -> None:
        if not namespace:
            raise ValueError("namespace must identify the model shard (model id, dtype, layout, tp rank/size)")
        self.config = config
        self.namespace = namespace
        self.chunk_tokens = config.chunk_tokens
        self.metrics = CacheMetrics(_metrics_label(namespace))
        self.l2: L2Tier | None = None
        if config.l2_path is not None:
            from kvport.cache.l2.local_disk import LocalDiskL2

            self.l2 = LocalDiskL2(config.l2_path, config.l2_bytes, fsync=config.l2_fsync, metrics=self.metrics)
        self.descriptor: CopyDescriptor | None = None
        self.backend: Backend | None = None
        self.l1: L1Pool | None = None
        self._scratch: torch.Tensor | None = None  # one chunk, for L2 reads when every L1 slot is pinned
        self._scratch_lock = threading.Lock()
        # Reads and writes use separate threads so a load's read-ahead never queues behind a burst of stores.
        self._readers: cf.ThreadPoolExecutor | None = None
        self._writers: cf.ThreadPoolExecutor | None = None
        self._writes: BoundedSubmitter | None = None
        self._worker: cf.ThreadPoolExecutor | None = None
        self._setup_lock = threading.Lock()
        self._closed = False
        if config.metrics_port is not None:
            serve_metrics(config.metrics_port)

    # ---- setup -------------------------------------------------------------------------------------------
    def bind(self, descriptor: CopyDescriptor, backend: Backend | None = None) -> None:
        """Attach the engine's KV memory (worker side): picks the backend and allocates the L1 pool once."""
        self._check_open()
        if self.descriptor is not None:
            raise RuntimeError("CacheEngine.bind called twice; create one engine per KV cache registration")
        for group in descriptor.groups:
            if self.chunk_tokens % group.tokens_per_block:
                raise UserError(
                    f"cache config: chunk_tokens={self.chunk_tokens} is not a multiple of layout "
                    f"{descriptor.layout} group {group.name!r} tokens_per_block={group.tokens_per_block}"
                )
        from kvport.hal.platform import detect_platform

        platform = detect_platform()
        if backend is None:
            from kvport.hal.registry import select_backend

            environ = {"KVPORT_BACKEND": self.config.backend} if self.config.backend else None
            backend = select_backend(platform, descriptor, environ=environ)
        chunk_bytes = descriptor.canonical_bytes(self.chunk_tokens)
        slot_bytes = L1Pool.slot_size(chunk_bytes)
        if self.config.l1_bytes < slot_bytes:
            raise UserError(
                f"cache config: l1_bytes={self.config.l1_bytes} is smaller than one chunk of layout "
                f"{descriptor.layout} ({slot_bytes} bytes with alignment, "
                f"chunk_tokens={self.chunk_tokens})"
            )
        import torch

        pin = platform.name in ("cuda", "rocm")  # pinned host memory exists only with a CUDA/ROCm driver
        self.l1 = L1Pool(self.config.l1_bytes, chunk_bytes, pin_memory=pin, metrics=self.metrics)
        self._scratch = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin)
        self.descriptor, self.backend = descriptor, backend

    @property
    def chunk_bytes(self) -> int:
        self._check_bound()
        return self.l1.chunk_bytes

    def chunk_keys(self, tokens: Sequence[int] | Any) -> list[str]:
        """One key per full chunk of ``tokens`` (a partial tail chunk has no key and is never stored)."""
        return list(self._iter_keys(tokens))

    def _iter_keys(self, tokens: Sequence[int] | Any) -> Iterator[str]:
        """The same keys, derived one at a time for loops that stop at the first miss."""
        return iter_chunk_keys(tokens, self.chunk_tokens, self.namespace, self.config.salt)

    # ---- lookup ------------------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int] | Any) -> int:
        """Longest cached prefix of ``tokens`` in tokens (a multiple of chunk_tokens), checking L1 then L2.
        A hit here is a promise load() keeps unless the chunk is evicted or found corrupt meanwhile."""
        self._check_open()
        start = time.perf_counter()
        in_l1 = in_l2 = 0
        for key in self._iter_keys(tokens):
            if self.l1 is not None and self.l1.contains(key):
                in_l1 += 1
            elif self.l2 is not None and self.l2.contains(key):
                in_l2 += 1
            else:
                self.metrics.inc("misses", op="lookup", tier="all")
                break
        # one update per tier, not per chunk: lookups sit on the scheduler's critical path
        found = in_l1 + in_l2
        if in_l1:
            self.metrics.inc("hits", in_l1, op="lookup", tier="l1")
        if in_l2:
            self.metrics.inc("hits", in_l2, op="lookup", tier="l2")
        self.metrics.observe("latency", time.perf_counter() - start, op="lookup")
        return found * self.chunk_tokens

    # ---- store -------------------------------------------------------------------------------------------
    def store(self, tokens, block_ids, num_tokens: int | None = None, skip_tokens: int = 0) -> int:
        """Gather the full chunks of ``tokens[:num_tokens]`` from the engine blocks into L1 and queue them for L2.

        Chunks before ``skip_tokens // chunk_tokens`` and chunks already cached are skipped. Returns the tokens
        gathered by this call. When this returns, the engine blocks may be reused; with ``async_store`` the L2
        write continues in the background. Stops (never blocks, never allocates) when L1 has no free slot.
        """
        self._check_bound()
        num_tokens = len(tokens) if num_tokens is None else num_tokens
        keys = self.chunk_keys(tokens[:num_tokens])
        tables = self.descriptor.normalize_block_ids(block_ids)
        stored = 0
        for index in range(skip_tokens // self.chunk_tokens, len(keys)):
            key = keys[index]
            if self.l1.contains(key) or (self.l2 is not None and self.l2.contains(key)):
                self.metrics.inc("skipped", reason="present")
                continue
            lease = self.l1.reserve(key)
            if lease is None:
                if self.l1.contains(key):  # stored meanwhile by another thread
                    continue
                break  # L1 exhausted (or the chunk is being written right now): later chunks would be unreachable
            start = time.perf_counter()
            try:
                self.backend.gather(self.descriptor, self._chunk_tables(tables, index), lease.buffer, self.chunk_tokens)
            except BaseException:
                self.l1.abort(lease)
                raise
            self.metrics.transfer("l1", "write", lease.buffer.numel(), time.perf_counter() - start)
            self.l1.commit(lease)
            stored += self.chunk_tokens
            self._to_l2(lease)
        self.metrics.inc("tokens_stored", stored)
        return stored

    def store_async(self, tokens, block_ids, num_tokens: int | None = None, skip_tokens: int = 0) -> Handle:
        """``store`` on the engine's worker thread; ``wait()`` returns once the blocks were gathered."""
        self._check_bound()
        return Handle(self._worker_pool().submit(self.store, tokens, block_ids, num_tokens, skip_tokens))

    def _to_l2(self, lease: Lease) -> None:
        """Hand a committed, pinned L1 chunk to L2; the pin keeps it in L1 until the write finished."""
        if self.l2 is None:
            lease.release()
            return
        if not self.config.async_store:
            self._write_l2(lease)
            return
        if self._write_queue().try_submit(self._write_l2, lease) is None:
            self.metrics.inc("skipped", reason="l2_queue_full")
            lease.release()

    def _write_l2(self, lease: Lease) -> None:
        try:
            start = time.perf_counter()
            if self.l2.put(lease.key, self.descriptor.fingerprint, lease.buffer):
                elapsed = time.perf_counter() - start
                self.metrics.transfer("l2", "write", lease.buffer.numel(), elapsed)
                self.metrics.observe("latency", elapsed, op="l2_write")
        except Exception:
            # A background write has no caller to raise to: count it and log it loudly, never swallow it.
            self.metrics.inc("failures", tier="l2", reason="write_exception")
            _log.exception("kvport cache: L2 write of chunk %s failed", lease.key)
        finally:
            lease.release()

    # ---- load --------------------------------------------------------------------------------------------
    def load(self, tokens, block_ids, num_tokens: int) -> int:
        """Scatter the cached full chunks of ``tokens[:num_tokens]`` into the engine blocks, in order.

        Stops at the first chunk that is missing or fails validation and returns the tokens loaded (a multiple
        of chunk_tokens). Every loaded chunk was checksummed; no partial or unverified bytes are scattered.
        """
        self._check_bound()
        keys = self.chunk_keys(tokens[:num_tokens])
        tables = self.descriptor.normalize_block_ids(block_ids)
        prefetch = self.config.prefetch and self.l2 is not None
        executor = self._read_pool() if prefetch else None
        fetches = fetch_in_order(keys, self._fetch, executor, self.config.prefetch_depth, _release_fetch)
        loaded = 0
        try:
            for index, got in enumerate(fetches):
                if got is _NO_SLOT:
                    if not self._load_via_scratch(keys[index], tables, index):
                        break
                elif got is None:
                    break
                else:
                    with got:
                        self._scatter(got.buffer, tables, index)
                loaded += self.chunk_tokens
        finally:
            fetches.close()
        self.metrics.inc("tokens_loaded", loaded)
        return loaded

    def load_async(self, tokens, block_ids, num_tokens: int) -> Handle:
        """``load`` on the engine's worker thread; ``wait()`` returns the tokens loaded."""
        self._check_bound()
        return Handle(self._worker_pool().submit(self.load, tokens, block_ids, num_tokens))

    def prefetch(self, tokens) -> Handle:
        """Pull the cached prefix of ``tokens`` from L2 into L1 in the background; ``wait()`` returns the tokens
        now in L1 (the load that follows then reads memory only)."""
        self._check_bound()

        def run() -> int:
            count = 0
            for key in self._iter_keys(tokens):
                got = self._fetch(key)
                if got is None or got is _NO_SLOT:
                    break
                got.release()
                count += self.chunk_tokens
            return count

        return Handle(self._read_pool().submit(run))

    def _fetch(self, key: str):
        """A pinned L1 lease holding ``key`` (read from L2 into L1 if needed), None on a miss, or _NO_SLOT."""
        lease = self.l1.acquire(key)
        if lease is not None:
            self.metrics.inc("hits", op="load", tier="l1")
            return lease
        if self.l2 is None:
            self.metrics.inc("misses", op="load", tier="l1")
            return None
        lease = self.l1.reserve(key)
        if lease is None:
            # Either another thread is filling this key right now (wait for it, briefly) or every slot is pinned
            # (the caller falls back to the scratch buffer).
            lease = self.l1.acquire(key, wait_fill=_FILL_WAIT_S)
            if lease is None:
                return _NO_SLOT
            self.metrics.inc("hits", op="load", tier="l1")
            return lease
        if self._read_l2(key, lease.buffer):
            self.l1.commit(lease)
            return lease
        self.l1.abort(lease)
        return None

    def _read_l2(self, key: str, dst: torch.Tensor) -> bool:
        start = time.perf_counter()
        result = self.l2.get_into(key, self.descriptor.fingerprint, dst)
        elapsed = time.perf_counter() - start
        if result is ReadResult.HIT:
            self.metrics.inc("hits", op="load", tier="l2")
            self.metrics.transfer("l2", "read", dst.numel(), elapsed)
            self.metrics.observe("latency", elapsed, op="l2_read")
            return True
        self.metrics.inc("misses", op="load", tier="l2")
        return False

    def _load_via_scratch(self, key: str, tables: list, index: int) -> bool:
        with self._scratch_lock:
            if not self._read_l2(key, self._scratch):
                return False
            self._scatter(self._scratch, tables, index)
            return True

    def _scatter(self, src: torch.Tensor, tables: list, index: int) -> None:
        start = time.perf_counter()
        self.backend.scatter(src, self.descriptor, self._chunk_tables(tables, index), self.chunk_tokens)
        self.metrics.transfer("l1", "read", src.numel(), time.perf_counter() - start)

    def _chunk_tables(self, tables: list, index: int) -> list:
        """Per group, the block ids chunk ``index`` occupies."""
        out = []
        for group, table in zip(self.descriptor.groups, tables):
            per_chunk = self.chunk_tokens // group.tokens_per_block
            out.append(table[index * per_chunk : (index + 1) * per_chunk])
        return out

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, bytes, failures, evictions, skipped, tokens...) plus the pools' state."""
        out = self.metrics.snapshot()
        if self.l1 is not None:
            out["l1_chunks"] = len(self.l1)
            out["l1_capacity_chunks"] = self.l1.num_slots
            out["l1_pinned_chunks"] = self.l1.pinned_count()
        out["pending_l2_writes"] = self._writes.pending() if self._writes is not None else 0
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait for queued stores and their L2 writes (visible to other processes afterwards); TimeoutError when
        that takes longer than ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._worker is not None:
            self._worker.submit(lambda: None).result(timeout)
        if self._writes is not None:
            self._writes.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self, drain: bool = True) -> None:
        """Finish (``drain``) or cancel queued background work, then stop the threads. Every chunk ends up
        wholly stored or absent: a write in progress completes its rename or leaves only a temp file."""
        if self._closed:
            return
        # The worker stops first: a store it is running still queues L2 writes, which the drain or drop below
        # must see (dropping first let the writers' shutdown cancel those writes uncounted).
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=not drain)
        if self._writes is not None:
            if drain:
                self._writes.drain()
            else:
                self.metrics.inc("skipped", self._writes.drop(), reason="dropped_at_close")
        for pool in (self._readers, self._writers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=not drain)
        if self.l2 is not None:
            self.l2.close()
        self._closed = True

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CacheEngine is closed")

    def _check_bound(self) -> None:
        self._check_open()
        if self.descriptor is None:
            raise RuntimeError("CacheEngine.bind(descriptor) must be called before load/store (worker side)")

    def _read_pool(self) -> cf.ThreadPoolExecutor:
        with self._setup_lock:
            if self._readers is None:
                self._readers = cf.ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="kvport-read")
            return self._readers

    def _write_queue(self) -> BoundedSubmitter:
        with self._setup_lock:
            if self._writes is None:
                self._writers = cf.ThreadPoolExecutor(self.config.l2_write_threads, thread_name_prefix="kvport-write")
                self._writes = BoundedSubmitter(self._writers, self.config.max_pending_stores)
            return self._writes

    def _worker_pool(self) -> cf.ThreadPoolExecutor:
        with self._setup_lock:
            if self._worker is None:
                self._worker = cf.ThreadPoolExecutor(1, thread_name_prefix="kvport-cache")
            return self._worker


def _release_fetch(got) -> None:
    if isinstance(got, Lease):
        got.release()
