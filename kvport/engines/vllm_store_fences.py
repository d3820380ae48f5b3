"""Asynchronous stores for the vLLM connector: which requests' in-flight stores must be fenced before a forward, and
which finished requests keep their blocks until their stores are done. Owns that bookkeeping; must not import vLLM.

A store reads vLLM's blocks after the forward that wrote them while the next forwards run (nothing orders the engine's
stream after it). Blocks a store still reads are rewritten only after vLLM gives them to other tokens: when their
request finishes (``request_finished`` then asks vLLM to keep them until the worker reports the request's stores done:
``StoreFences.finished`` / ``PendingStores.finished``), or while it runs (preemption, a sliding window dropping them):
then the scheduler names the request in that step's fences and the worker orders the engine's stream after its
stores before the forward (``handle_preemptions``). Both sides derive their state from the same metadata sequence."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Block = tuple[int, int]  # (KV cache group, block id): vLLM's block ids are per group


def stored_blocks(block_ids: Sequence[Sequence[int]], block_size: int, start: int, end: int) -> set[Block]:
    """The blocks of every group that hold tokens [start, end)."""
    first, last = start // block_size, -(-end // block_size)
    return {(g, b) for g, ids in enumerate(block_ids) for b in ids[first:last]}


def group_blocks(block_ids: Iterable[Sequence[int]] | None) -> set[Block]:
    """vLLM's per-group block lists (a tuple of lists, or None) as (group, block) pairs."""
    return {(g, b) for g, ids in enumerate(block_ids or ()) for b in ids}


class StoreFences:
    """Scheduler side: per request, the blocks its stores read since its last fence."""

    def __init__(self) -> None:
        self._unfenced: dict[str, set[Block]] = {}
        self.fenced = 0  # fences emitted (each makes one forward wait for one request's stores)
        self.delayed_frees = 0  # finished requests whose blocks vLLM keeps until the workers report their stores

    def fences(self, allocated: set[Block], preempted: Iterable[str]) -> list[str]:
        """Requests whose stores must be ordered before this step's forward: preempted ones (vLLM freed their
        blocks) and those whose stores read a block vLLM handed out in this step (``allocated``). Call before
        ``stored`` for the same step (the worker fences before it stores)."""
        preempted = set(preempted)
        out = [r for r, blocks in self._unfenced.items() if r in preempted or not blocks.isdisjoint(allocated)]
        for req_id in out:
            del self._unfenced[req_id]
        self.fenced += len(out)
        return out

    def stored(self, req_id: str, blocks: set[Block]) -> None:
        """A store of ``blocks`` for ``req_id`` goes out with this step's metadata."""
        self._unfenced.setdefault(req_id, set()).update(blocks)

    def finished(self, req_id: str) -> bool:
        """vLLM finished ``req_id``: True when its blocks must stay until the workers report its stores done."""
        delay = self._unfenced.pop(req_id, None) is not None
        self.delayed_frees += delay
        return delay

    def pending(self) -> int:
        return len(self._unfenced)


class PendingStores:
    """Worker side: per request, the completions of its stores since its last fence, and the finished requests
    waiting for theirs."""

    def __init__(self) -> None:
        self._stores: dict[str, list[Any]] = {}
        self._finished: dict[str, list[Any]] = {}
        self.reported = 0  # requests reported to vLLM as done storing

    def add(self, req_id: str, completion: Any) -> None:
        """A store issued for ``req_id`` (call before issuing it, with None, if the issue may fail: the request must
        still be reported when it finishes)."""
        parts = self._stores.setdefault(req_id, [])
        if completion is not None:
            parts[:] = [c for c in parts if not c.done()]
            parts.append(completion)

    def fence(self, req_ids: Iterable[str]) -> int:
        """Order the engine's current stream after every store of ``req_ids`` (no host wait); returns how many
        stores were still running."""
        waited = 0
        for req_id in req_ids:
            for completion in self._stores.pop(req_id, ()):
                if not completion.done():
                    completion.wait_on()
                    waited += 1
        return waited

    def finished(self, req_ids: Iterable[str]) -> set[str]:
        """Of the finished requests vLLM names now or named before, those whose stores are all done: vLLM frees
        their blocks once every worker reported them (``finished_sending``)."""
        for req_id in req_ids:
            if req_id in self._stores:
                self._finished[req_id] = self._stores.pop(req_id)
        done = {r for r, parts in self._finished.items() if all(c.done() for c in parts)}
        for req_id in done:
            del self._finished[req_id]
        self.reported += len(done)
        return done

    def running(self) -> int:
        """Stores issued and not yet done, of running and finished requests."""
        parts = [c for group in (self._stores, self._finished) for cs in group.values() for c in cs]
        return sum(not c.done() for c in parts)
