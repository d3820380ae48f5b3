"""The server's L1: one L1Pool over the shared arena, slots of one size, shared by every namespace (one LRU), and
the per-namespace view a ChunkStore uses. Owns slot sizing and buffer narrowing; must not talk to clients."""

from __future__ import annotations

import threading
from collections.abc import Collection

from kvport.errors import UserError
from kvport.server.shm import SharedArena
from kvport.store.l1 import SLOT_ALIGN, L1Pool, Lease
from kvport.store.metrics import CacheMetrics


class SharedL1:
    """Slots are sized when the first namespace opens (its chunk, 4 KiB aligned) unless ``slot_bytes`` is set;
    a namespace whose chunk is larger than a slot is refused (one line naming ``slot_bytes``). Keys are unique
    across namespaces (the key chain is rooted in the namespace), so one index serves them all."""

    def __init__(self, arena: SharedArena, capacity: int, metrics: CacheMetrics, slot_bytes: int | None = None) -> None:
        self.arena, self.capacity, self.metrics = arena, capacity, metrics
        self.slot_bytes = L1Pool.slot_size(slot_bytes) if slot_bytes else None
        self.pool: L1Pool | None = None
        self._lock = threading.Lock()

    def view_for(self, chunk_bytes: int) -> NamespaceL1:
        with self._lock:
            if self.pool is None:
                slot = self.slot_bytes or L1Pool.slot_size(chunk_bytes)
                if self.capacity < slot:
                    raise UserError(f"server: l1_bytes={self.capacity} is smaller than one chunk ({slot} bytes)")
                self.pool = L1Pool(self.capacity, slot, metrics=self.metrics, allocate=self._allocate)
                self.slot_bytes = slot
            if chunk_bytes > self.pool.chunk_bytes:
                raise UserError(
                    f"server: a chunk of {chunk_bytes} bytes does not fit the server's L1 slots of "
                    f"{self.pool.chunk_bytes} bytes (sized by the first model served); set slot_bytes in the server "
                    "config to the largest chunk of every model it serves"
                )
            return NamespaceL1(self.pool, chunk_bytes)

    def _allocate(self, nbytes: int):
        if nbytes > self.arena.nbytes:
            raise RuntimeError(f"L1 pool wants {nbytes} bytes of a {self.arena.nbytes}-byte arena")
        return self.arena.tensor[:nbytes]

    @staticmethod
    def arena_bytes(capacity: int) -> int:
        """Arena size for an L1 of ``capacity`` bytes (the pool aligns its first slot to a page)."""
        return capacity + SLOT_ALIGN

    def usage(self) -> dict[str, int]:
        pool = self.pool
        if pool is None:
            return {"slots": 0, "used": 0, "pinned": 0, "slot_bytes": self.slot_bytes or 0, "bytes": self.capacity}
        return {
            "bytes": self.capacity,
            "slots": pool.num_slots,
            "used": len(pool),
            "pinned": pool.pinned_count(),
            "slot_bytes": pool.slot_bytes,
        }


class NamespaceL1:
    """What a ChunkStore needs of an L1Pool, over the shared pool: the same calls, with every lease's buffer cut to
    this namespace's chunk size (tier reads and writes take exactly one chunk)."""

    def __init__(self, pool: L1Pool, chunk_bytes: int) -> None:
        self.pool, self.chunk_bytes = pool, chunk_bytes
        self.num_slots = pool.num_slots
        self.slot_bytes = pool.slot_bytes

    def _cut(self, lease: Lease | None) -> Lease | None:
        if lease is not None:
            lease.buffer = lease.buffer[: self.chunk_bytes]
        return lease

    def __len__(self) -> int:
        return len(self.pool)

    def contains(self, key: str) -> bool:
        return self.pool.contains(key)

    def count_prefix(self, keys) -> int:
        return self.pool.count_prefix(keys)

    def acquire(self, key: str, wait_fill: float = 0.0) -> Lease | None:
        return self._cut(self.pool.acquire(key, wait_fill))

    def reserve(self, key: str, protect: Collection[str] = ()) -> Lease | None:
        return self._cut(self.pool.reserve(key, protect))

    def commit(self, lease: Lease) -> None:
        self.pool.commit(lease)

    def abort(self, lease: Lease) -> None:
        self.pool.abort(lease)

    def discard(self, key: str) -> bool:
        return self.pool.discard(key)

    def pinned_count(self) -> int:
        return self.pool.pinned_count()
