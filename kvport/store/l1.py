"""The L1 pool: one host buffer allocated once and sliced into chunk-sized slots, with LRU eviction and pins.
Owns slot bookkeeping; must not allocate after construction, evict a pinned slot, or know about tiers or backends."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Slots start on 4 KiB boundaries so that O_DIRECT-style I/O and DMA engines see page-aligned buffers.
SLOT_ALIGN = 4096


@dataclasses.dataclass
class _Entry:
    slot: int
    pins: int = 0
    visible: bool = False  # False while being written: lookups must not see a half-filled slot


class Lease:
    """A pin on one slot: the slot's bytes stay put (never evicted, never reused) until ``release``."""

    __slots__ = ("pool", "key", "slot", "buffer", "_released")

    def __init__(self, pool: L1Pool, key: str, slot: int, buffer: torch.Tensor) -> None:
        self.pool, self.key, self.slot, self.buffer = pool, key, slot, buffer
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._unpin(self.key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class L1Pool:
    """Fixed number of chunk slots in one allocation. Thread-safe.

    ``reserve`` gives a hidden, pinned slot to fill; ``commit`` makes it visible, ``abort`` frees it. ``acquire``
    pins a visible slot for reading. When every slot is pinned, ``reserve`` returns None (the caller skips the
    store): exhaustion never allocates more memory.
    """

    def __init__(
        self, capacity_bytes: int, chunk_bytes: int, pin_memory: bool = False, metrics=None, allocate=None
    ) -> None:
        """``allocate(nbytes)`` gives the host memory (a platform's pinned allocator); default torch.empty, pinned
        when ``pin_memory``."""
        import torch

        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self.slot_bytes = self.slot_size(chunk_bytes)
        self.num_slots = capacity_bytes // self.slot_bytes
        if allocate is None:

            def allocate(nbytes: int) -> torch.Tensor:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=bool(pin_memory))

        # The host allocator only promises 64-byte alignment: over-allocate one page and start on a boundary.
        raw = allocate(self.num_slots * self.slot_bytes + SLOT_ALIGN)
        self.pinned = raw.is_pinned()
        skip = -raw.data_ptr() % SLOT_ALIGN
        self.memory = raw[skip : skip + self.num_slots * self.slot_bytes]
        self._lock = threading.Lock()
        self._filled = threading.Condition(self._lock)  # notified whenever a reserved slot is committed or aborted
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # LRU first
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.metrics = metrics  # a CacheMetrics, or None
        self.evictions = 0
        self.exhausted = 0

    def _view(self, slot: int) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.memory[start : start + self.chunk_bytes]

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.visible)

    def contains(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.visible

    def count_prefix(self, keys: Iterable[str]) -> int:
        """How many of ``keys``, from the first, are visible here (one lock for the whole run)."""
        count = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.visible:
                    break
                count += 1
        return count

    def acquire(self, key: str, wait_fill: float = 0.0) -> Lease | None:
        """Pin a visible chunk for reading and mark it most recently used; None when absent. With ``wait_fill``,
        a chunk another thread is filling right now is waited for, up to that many seconds."""
        with self._lock:
            if wait_fill > 0:
                self._filled.wait_for(lambda: self._entries.get(key) is None or self._entries[key].visible, wait_fill)
            entry = self._entries.get(key)
            if entry is None or not entry.visible:
                return None
            entry.pins += 1
            self._entries.move_to_end(key)
            return Lease(self, key, entry.slot, self._view(entry.slot))

    def reserve(self, key: str, protect: Collection[str] = ()) -> Lease | None:
        """A pinned, invisible slot for ``key``; None when the key is already present or no slot is free.
        Chunks in ``protect`` (the request's own earlier chunks) are never evicted to make room."""
        with self._lock:
            if key in self._entries:
                return None
            slot = self._take_slot(protect)
            if slot is None:
                self.exhausted += 1
                if self.metrics is not None:
                    self.metrics.inc("skipped", reason="l1_exhausted")
                return None
            self._entries[key] = _Entry(slot, pins=1)
            return Lease(self, key, slot, self._view(slot))

    def commit(self, lease: Lease) -> None:
        """Make a reserved slot visible to readers; the lease stays pinned until released."""
        with self._lock:
            self._entries[lease.key].visible = True
            self._entries.move_to_end(lease.key)
            self._filled.notify_all()

    def abort(self, lease: Lease) -> None:
        """Drop a reserved slot that was not filled (a failed gather or read)."""
        with self._lock:
            entry = self._entries.pop(lease.key, None)
            if entry is not None:
                self._free.append(entry.slot)
            lease._released = True
            self._filled.notify_all()

    def discard(self, key: str) -> bool:
        """Remove a visible, unpinned chunk (e.g. found stale); pinned chunks stay until their readers finish."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins:
                return False
            del self._entries[key]
            self._free.append(entry.slot)
            return True

    @staticmethod
    def slot_size(chunk_bytes: int) -> int:
        return -(-chunk_bytes // SLOT_ALIGN) * SLOT_ALIGN

    def pinned_count(self, among: Collection[str] | None = None) -> int:
        """Slots pinned now (being filled, read or written to a tier); with ``among``, only those of these keys."""
        with self._lock:
            if among is None:
                return sum(1 for e in self._entries.values() if e.pins)
            return sum(1 for key in among if (e := self._entries.get(key)) is not None and e.pins)

    def _unpin(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def _take_slot(self, protect: Collection[str] = ()) -> int | None:
        if self._free:
            return self._free.pop()
        for key, entry in self._entries.items():  # LRU order: the first unpinned visible entry goes
            if entry.pins == 0 and entry.visible and key not in protect:
                del self._entries[key]
                self.evictions += 1
                if self.metrics is not None:
                    self.metrics.inc("evictions", tier="l1")
                return entry.slot
        return None
