"""The chunk store: the L1 host pool plus an ordered list of tiers, and the policy that connects them.
Owns lookup, admission (write-through to every tier), fetch (its read-ahead walk: kvport.store.read_ahead) and the
store's metrics; must not know devices, descriptors, backends or engines (the cache's mover moves bytes)."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvport.errors import UserError
from kvport.store.keys import iter_chunk_keys
from kvport.store.l1 import L1Pool, Lease
from kvport.store.metrics import CacheMetrics
from kvport.store.read_ahead import ReadAhead, read_result
from kvport.store.tiers import ReadResult, build_tier

if TYPE_CHECKING:
    import torch

    from kvport.cache.config import CacheConfig
    from kvport.store.tiers.base import Tier

_log = logging.getLogger("kvport.store")


class ChunkStore:
    """One namespace's chunks. Lookups work before ``open_l1`` (a scheduler process has tiers only); loads and
    stores need L1, opened once the chunk size and layout fingerprint are known."""

    def __init__(
        self,
        config: CacheConfig,
        namespace: str,
        metrics: CacheMetrics | None = None,
        tiers: Sequence[Tier] | None = None,
    ) -> None:
        """``tiers``: already built tiers to use instead of building the config's (a server shares one set across
        namespaces); the store then does not close them."""
        if not namespace:
            raise ValueError("namespace must identify the model shard (model id, dtype, layout, tp rank/size)")
        self.config = config
        self.namespace = namespace
        self.chunk_tokens = config.chunk_tokens
        self.metrics = metrics or CacheMetrics(namespace)
        self.tiers: list[Tier] = list(tiers or ())
        self._owns_tiers = tiers is None
        try:
            for i, spec in enumerate(config.tier_specs() if tiers is None else ()):
                tier = build_tier(spec, f"cache config: tiers[{i}] ({spec.get('type')})", self.metrics)
                self.tiers.append(tier)
                tier.use_namespace(namespace)  # tiers shared by several stores (the server's) record none
        except BaseException:
            self.close(drain=False)
            raise
        self.l1: L1Pool | None = None
        self.fingerprint: str | None = None
        self._writes_lock = threading.Condition()
        self._pending_writes = 0
        self._write_futures: set[cf.Future] = set()
        self._closed = False

    def open_l1(self, chunk_bytes: int, fingerprint: str, allocate: Callable[[int], torch.Tensor]) -> None:
        """Allocate L1 for chunks of ``chunk_bytes`` (with ``allocate``, the platform's host allocator)."""
        if self.l1 is not None:
            raise RuntimeError("ChunkStore.open_l1 called twice")
        slot_bytes = L1Pool.slot_size(chunk_bytes)
        if self.config.l1_bytes < slot_bytes:
            raise UserError(
                f"cache config: l1_bytes={self.config.l1_bytes} is smaller than one chunk ({slot_bytes} bytes with "
                f"alignment, chunk_tokens={self.chunk_tokens})"
            )
        for tier in self.tiers:
            tier.check_chunk(chunk_bytes)  # a tier that cannot hold one chunk would evict on every write, keep nothing
        self.l1 = L1Pool(self.config.l1_bytes, chunk_bytes, metrics=self.metrics, allocate=allocate)
        self.fingerprint = fingerprint
        for tier in self.tiers:  # once, so a zero-copy tier can register L1 with its transport
            tier.register_memory(self.l1.memory)

    def use_l1(self, l1: Any, fingerprint: str) -> None:
        """Use an L1 someone else owns (the server's shared pool, through a view with L1Pool's calls)."""
        if self.l1 is not None:
            raise RuntimeError("ChunkStore already has an L1")
        self.l1, self.fingerprint = l1, fingerprint

    # ---- keys and lookup -------------------------------------------------------------------------------------
    def iter_keys(self, tokens, extra: bytes = b"") -> Iterator[str]:
        """One key per full chunk of ``tokens``, derived as asked for (a lookup that stops early hashes no further).
        ``extra``: the request's own root component (kvport.store.keys.root_digest). SGLang-compatible page keys
        carry no per-request component: a request with one gets kvport's own chain, isolated but not shareable."""
        if self.config.key_scheme == "sglang" and not extra:
            from kvport.store.page_keys import iter_page_keys

            return iter_page_keys(tokens, self.chunk_tokens, self.namespace, self.config.salt)
        return iter_chunk_keys(tokens, self.chunk_tokens, self.namespace, self.config.salt, extra)

    def keys(self, tokens, extra: bytes = b"") -> list[str]:
        return list(self.iter_keys(tokens, extra))

    def lookup(self, tokens, start: int = 0, extra: bytes = b"") -> int:
        """Consecutive chunks of ``tokens`` present in L1 or any tier, counted from chunk ``start`` (a promise a load
        keeps unless a chunk is evicted or found corrupt meanwhile). Tiers are asked in batches that grow 1, 8,
        64...: a miss costs one key, a long hit a few round trips per tier, never one per chunk."""
        return self.lookup_keys(itertools.islice(self.iter_keys(tokens, extra), start, None))

    def lookup_keys(self, keys: Iterator[str] | Sequence[str]) -> int:
        """``lookup`` for keys the engine derived itself (SGLang hands page hashes, not tokens)."""
        self._check_open()
        begin = time.perf_counter()
        keys = iter(keys)
        found = {"l1": 0}
        pending: deque[str] = deque()
        batch, missed = 1, False
        while True:
            if not pending:
                pending.extend(_take(keys, batch))
                if not pending:
                    break
            in_l1 = self.l1.count_prefix(pending) if self.l1 is not None else 0
            if in_l1:  # one lock for the whole run, not one per chunk (512 L1 hits: 271 -> ~60 us)
                for _ in range(in_l1):
                    pending.popleft()
                found["l1"] += in_l1
                batch = min(batch * 8, 512)
                continue
            best, best_tier = 0, None
            for tier in self.tiers:
                got = _safe_contains(tier, list(pending))
                if got > best:
                    best, best_tier = got, tier.kind
                if got == len(pending):
                    break
            if not best:
                missed = True
                break
            found[best_tier] = found.get(best_tier, 0) + best
            for _ in range(best):
                pending.popleft()
            batch = min(batch * 8, 512)
        total = sum(found.values())
        if missed:
            self.metrics.inc("misses", op="lookup", tier="all")
        for tier, count in found.items():  # one update per tier, not per chunk: lookups sit on the critical path
            if count:
                self.metrics.inc("hits", count, op="lookup", tier=tier)
        self.metrics.observe("latency", time.perf_counter() - begin, op="lookup")
        return total

    # ---- store side ------------------------------------------------------------------------------------------
    def absent(self, keys: Sequence[str], start: int = 0) -> list[int]:
        """Indices ``>= start`` of the chunks to store: not in L1, and past the run the tiers already hold."""
        if start >= len(keys):
            return []
        held = max((_safe_contains(t, list(keys[start:])) for t in self.tiers), default=0)
        out = []
        for index in range(start, len(keys)):
            if index < start + held or self.l1.contains(keys[index]):
                self.metrics.inc("skipped", reason="present")
                continue
            out.append(index)
        return out

    def reserve(self, key: str, protect=()) -> Lease | None:
        self._check_l1()
        return self.l1.reserve(key, protect)

    def abort(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            self.l1.abort(lease)

    def admit(self, leases: Sequence[Lease]) -> None:
        """Make filled chunks visible in L1 and write them through to every tier; each lease is released once its
        writes finished (the pin keeps the bytes in L1 until then)."""
        for lease in leases:
            self.l1.commit(lease)
        for lease in leases:
            self._write_through(lease, self.tiers)

    def _write_through(self, lease: Lease, tiers: Sequence[Tier]) -> None:
        if not tiers:
            lease.release()
            return
        with self._writes_lock:
            if self._pending_writes >= self.config.max_pending_stores:
                self.metrics.inc("skipped", reason="tier_queue_full")
                lease.release()
                return
            self._pending_writes += 1
        futures = []
        try:
            for tier in tiers:
                futures.extend(tier.put([lease.key], self.fingerprint, [lease.buffer]))
        except Exception:
            self.metrics.inc("failures", tier="all", reason="write_exception")
            _log.exception("kvport store: writing chunk %s failed to start", lease.key)
        left = [len(futures)]
        lock = threading.Lock()

        def one_done(future: cf.Future) -> None:
            if not future.cancelled() and future.exception() is not None:
                # A background write has no caller to raise to: count it and log it loudly, never swallow it.
                self.metrics.inc("failures", tier="all", reason="write_exception")
                _log.error("kvport store: writing chunk %s failed: %r", lease.key, future.exception())
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._write_finished(lease, futures)

        with self._writes_lock:
            self._write_futures.update(futures)
        if not futures:
            self._write_finished(lease, futures)
        for future in futures:
            future.add_done_callback(one_done)
        if not self.config.async_store:
            cf.wait(futures)

    def _write_finished(self, lease: Lease, futures: list[cf.Future]) -> None:
        lease.release()
        with self._writes_lock:
            self._pending_writes -= 1
            self._write_futures.difference_update(futures)
            self._writes_lock.notify_all()

    # ---- load side -------------------------------------------------------------------------------------------
    def fetch(self, keys: Sequence[str]) -> Iterator[Any]:
        """For each key in order: a pinned L1 lease holding the chunk (read from a tier if needed), None on a miss
        (the consumer stops), or NO_SLOT (a tier holds it but no L1 slot is free: see ``read_into``). Tier reads run
        ``prefetch_depth`` chunks ahead in one batched call per tier; whatever the consumer does not take is
        committed to L1 (or dropped) once its read finished, never left pinned (kvport.store.read_ahead)."""
        self._check_l1()
        depth = self.config.prefetch_depth if (self.config.prefetch and self.tiers) else 1
        reads = ReadAhead(self.l1, self.tiers, self.metrics, self.fingerprint, self._write_through, depth)
        yield from reads.walk(keys)

    def read_into(self, key: str, dst: torch.Tensor) -> bool:
        """Read a chunk from the first tier that has a valid copy straight into ``dst`` (L1 bypassed)."""
        for tier in self.tiers:
            future = tier.get([key], self.fingerprint, [dst])[0]
            if read_result(future, tier.timeout_s) is ReadResult.HIT:
                self.metrics.inc("hits", op="load", tier=tier.kind)
                return True
            if not future.done():
                # ``dst`` is the caller's to reuse once this returns: a read past its bound is waited out here (the
                # rare path: every L1 slot pinned and a tier not answering), never left writing into it.
                self.metrics.inc("failures", tier=tier.kind, reason="timeout")
                cf.wait([future])
                return False
        return False

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def pending_writes(self) -> int:
        with self._writes_lock:
            return self._pending_writes

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued tier write finished; TimeoutError if some are pending after ``timeout`` s."""
        with self._writes_lock:
            if not self._writes_lock.wait_for(lambda: self._pending_writes == 0, timeout):
                raise TimeoutError(f"{self._pending_writes} tier writes still pending after {timeout} s")

    def drop_pending(self) -> int:
        """Cancel tier writes not started yet; returns how many chunks were dropped (running writes finish)."""
        with self._writes_lock:
            futures = list(self._write_futures)
        return sum(1 for f in futures if f.cancel())

    def stats(self) -> dict[str, Any]:
        out = self.metrics.snapshot()
        if self.l1 is not None:
            out["l1_chunks"] = len(self.l1)
            out["l1_capacity_chunks"] = self.l1.num_slots
            out["l1_pinned_chunks"] = self.l1.pinned_count()
        out["pending_tier_writes"] = self.pending_writes()
        out["tiers"] = [t.describe() for t in self.tiers]
        return out

    def close(self, drain: bool = True) -> None:
        if self._closed:
            return
        if drain:
            self.flush()
        else:
            self.metrics.inc("skipped", self.drop_pending(), reason="dropped_at_close")
        if self._owns_tiers:
            for tier in self.tiers:
                tier.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the chunk store is closed")

    def _check_l1(self) -> None:
        self._check_open()
        if self.l1 is None:
            raise RuntimeError("the chunk store has no L1 yet (bind the cache engine first)")


def _take(keys: Iterator[str], count: int) -> list[str]:
    out = []
    for key in keys:
        out.append(key)
        if len(out) == count:
            break
    return out


def _safe_contains(tier: Tier, keys: list[str]) -> int:
    try:
        return tier.contains_prefix(keys)
    except Exception:  # a tier that cannot answer holds nothing for this request; its own metrics say why
        _log.warning("kvport store: %s could not answer a lookup", tier.describe(), exc_info=True)
        return 0
