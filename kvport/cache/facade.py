"""What every cache an engine adapter uses shares (the in-process CacheEngine, the server's RemoteCache): the bound
mover's descriptor and backend, the tickets in flight, the open/bound checks, the blocking store/load over each one's
submit_store/submit_load. Must not move bytes or decide policy."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvport.cache.mover import ChunkMover
    from kvport.cache.pipeline import Ticket
    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor


class CacheFacade:
    """Subclasses call ``_init_facade()`` in their constructor and set ``self.mover`` at bind."""

    mover: ChunkMover | None = None

    def _init_facade(self) -> None:
        self._inflight: set[Ticket] = set()  # submitted, not yet settled: flush and close wait for them
        self._inflight_lock = threading.Lock()
        self._closed = False

    @property
    def descriptor(self) -> CopyDescriptor | None:
        return self.mover.descriptor if self.mover is not None else None

    @property
    def backend(self) -> Backend | None:
        return self.mover.backend if self.mover is not None else None

    def store(self, tokens, block_ids, num_tokens: int | None = None, skip_tokens: int = 0, extra: bytes = b"") -> int:
        """``submit_store`` and wait until the chunks are in L1 (and, without ``async_store``, in every tier).
        Returns the tokens stored; the blocks may be reused when it returns."""
        return self.submit_store(tokens, block_ids, num_tokens, skip_tokens, extra).wait()

    def load(self, tokens, block_ids, num_tokens: int, skip_tokens: int = 0, extra: bytes = b"") -> int:
        """``submit_load`` and wait until the blocks hold the loaded KV; returns the tokens loaded."""
        return self.submit_load(tokens, block_ids, num_tokens, skip_tokens, extra).wait()

    def chunk_tables(self, tables: list, index: int) -> list:
        """Per group, the block ids chunk ``index`` occupies in ``tables`` (one block table per group)."""
        out = []
        for group, table in zip(self.descriptor.groups, tables):
            per_chunk = self.chunk_tokens // group.tokens_per_block
            out.append(table[index * per_chunk : (index + 1) * per_chunk])
        return out

    # ---- tickets in flight -----------------------------------------------------------------------------------
    def _track(self, ticket: Ticket) -> None:
        with self._inflight_lock:
            self._inflight.add(ticket)
        ticket.on_settled(lambda: self._untrack(ticket))

    def _untrack(self, ticket: Ticket) -> None:
        with self._inflight_lock:
            self._inflight.discard(ticket)

    def _settle_inflight(self, deadline: float | None = None, swallow: bool = False) -> None:
        """Wait for every ticket in flight now (until the monotonic ``deadline``); ``swallow`` their errors (at
        close: their own callers see them, and closing must still release everything)."""
        with self._inflight_lock:
            inflight = list(self._inflight)
        for ticket in inflight:
            try:
                ticket.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception:
                if not swallow:
                    raise

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def close(self, drain: bool = True) -> None:  # pragma: no cover - every facade has its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _check_bound(self) -> None:
        self._check_open()
        if self.mover is None:
            raise RuntimeError(f"{type(self).__name__}.bind(descriptor) must be called before load/store (worker side)")
