"""One fetch through L1: per chunk key in order a pinned L1 lease, a miss or NO_SLOT, with tier reads issued ahead.
Owns the window of reserved slots and tier reads, the fall-through to slower tiers and the settling of reads nobody
took; must not write to tiers itself (a promotion goes through the store's write-through) or leave a slot pinned."""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvport.store.l1 import L1Pool, Lease
from kvport.store.tiers import ReadResult

if TYPE_CHECKING:
    from kvport.store.metrics import CacheMetrics
    from kvport.store.tiers.base import Tier

_log = logging.getLogger("kvport.store")
# A fetch yields this for a chunk a tier holds when no L1 slot is free to read it into (every slot pinned).
NO_SLOT = object()
# Longest wait for a chunk another thread is reading into L1 (one chunk read takes milliseconds).
FILL_WAIT_S = 1.0


class ReadAhead:
    """The walk of one fetch over ``keys``: L1 hits as leases at once, L1 misses read from the first tier
    ``depth`` chunks ahead in one batched call per run of misses. ``promote(lease, tiers)`` writes a chunk found
    in a slower tier back to the faster ones."""

    def __init__(
        self,
        l1: L1Pool,
        tiers: Sequence[Tier],
        metrics: CacheMetrics,
        fingerprint: str | None,
        promote: Callable[[Lease, Sequence[Tier]], None],
        depth: int,
    ) -> None:
        self.l1, self.tiers, self.metrics = l1, tiers, metrics
        self.fingerprint, self.promote, self.depth = fingerprint, promote, depth

    def walk(self, keys: Sequence[str]) -> Iterator[Any]:
        """For each key in order: a pinned lease holding the chunk, None on a miss (then the walk ends), or NO_SLOT.
        Whatever the consumer does not take is committed to L1 (or dropped) once its read finished."""
        window: deque[tuple[str, Any, Any]] = deque()  # (key, lease or result, tier future or None)
        next_key = 0
        try:
            while True:
                next_key = self._fill_window(keys, next_key, window)
                if not window:
                    return
                key, got, future = window.popleft()
                if future is not None:
                    got = self._finish_read(key, got, future)
                yield got
                if got is None:
                    return
        finally:
            for key, got, future in window:
                if future is not None:
                    future.add_done_callback(lambda f, k=key, lease=got: self._settle_unused(k, lease, f))
                elif isinstance(got, Lease):
                    got.release()

    def _fill_window(self, keys, next_key, window) -> int:
        """Queue up to ``depth`` keys: L1 hits as leases at once; L1 misses as reserved slots read in one batched
        call to the first tier."""
        reads: list[tuple[str, Lease]] = []
        while next_key < len(keys) and len(window) + len(reads) < self.depth:
            key = keys[next_key]
            lease = self.l1.acquire(key)
            if lease is not None:
                self.metrics.inc("hits", op="load", tier="l1")
                if reads:  # keep order: this hit waits behind the reads queued before it
                    self._issue_reads(reads, window)
                    reads = []
                window.append((key, lease, None))
            elif not self.tiers:
                self.metrics.inc("misses", op="load", tier="l1")
                if reads:
                    self._issue_reads(reads, window)
                    reads = []
                window.append((key, None, None))
                return len(keys)  # nothing after a miss can be loaded
            else:
                lease = self.l1.reserve(key)
                if lease is None:
                    # Another thread is filling this key right now (wait for it, briefly) or every slot is pinned.
                    lease = self.l1.acquire(key, wait_fill=FILL_WAIT_S)
                    if reads:
                        self._issue_reads(reads, window)
                        reads = []
                    if lease is not None:
                        self.metrics.inc("hits", op="load", tier="l1")
                    window.append((key, lease if lease is not None else NO_SLOT, None))
                else:
                    reads.append((key, lease))
            next_key += 1
        if reads:
            self._issue_reads(reads, window)
        return next_key

    def _issue_reads(self, reads: list[tuple[str, Lease]], window) -> None:
        tier = self.tiers[0]
        keys = [k for k, _ in reads]
        try:
            futures = tier.get(keys, self.fingerprint, [lease.buffer for _, lease in reads])
        except Exception as exc:
            futures = [failed_future(exc) for _ in reads]
        for (key, lease), future in zip(reads, futures):
            window.append((key, lease, future))

    def _finish_read(self, key: str, lease: Lease, future: cf.Future) -> Any:
        """The reserved lease once the first tier's read finished: committed on a hit, else tried on the next tiers
        (a hit there is promoted to the faster tiers); None when no tier has a valid copy."""
        tier_index = 0
        result = read_result(future, self.tiers[0].timeout_s)
        while result is not ReadResult.HIT and tier_index + 1 < len(self.tiers) and future.done():
            self.metrics.inc("misses", op="load", tier=self.tiers[tier_index].kind)
            tier_index += 1
            future = self.tiers[tier_index].get([key], self.fingerprint, [lease.buffer])[0]
            result = read_result(future, self.tiers[tier_index].timeout_s)
        if not future.done():
            # Past the tier's time bound: a miss for this request, but the tier may still write into the slot, so it
            # stays reserved (invisible, never reused) until the read really ends.
            self.metrics.inc("misses", op="load", tier=self.tiers[tier_index].kind)
            self.metrics.inc("failures", tier=self.tiers[tier_index].kind, reason="timeout")
            future.add_done_callback(lambda _f: self.l1.abort(lease))
            return None
        if result is not ReadResult.HIT:
            self.metrics.inc("misses", op="load", tier=self.tiers[tier_index].kind)
            self.l1.abort(lease)
            return None
        self.metrics.inc("hits", op="load", tier=self.tiers[tier_index].kind)
        self.l1.commit(lease)
        if tier_index:
            promoted = self.l1.acquire(key)
            if promoted is not None:
                self.promote(promoted, self.tiers[:tier_index])
        return lease

    def _settle_unused(self, key: str, lease: Lease, future: cf.Future) -> None:
        """A read-ahead nobody consumed: keep a valid chunk in L1 (unpinned), drop anything else."""
        if read_result(future) is ReadResult.HIT:
            self.l1.commit(lease)
            lease.release()
        else:
            self.l1.abort(lease)


def read_result(future: cf.Future, timeout: float | None = None) -> ReadResult:
    """The read's outcome; IO_ERROR when it failed or is still running after ``timeout`` seconds (the tier's bound)."""
    try:
        return future.result(timeout)
    except cf.TimeoutError:
        return ReadResult.IO_ERROR
    except Exception:
        _log.warning("kvport store: a tier read failed", exc_info=True)
        return ReadResult.IO_ERROR


def failed_future(exc: BaseException) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_exception(exc)
    return future
