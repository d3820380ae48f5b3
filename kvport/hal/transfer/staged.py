"""The staged transfer path: SM kernels between engine blocks and device staging pieces, the copy engine between
staging and host memory, through a ring of staging buffers. Owns those buffers, the launch list (pieces, stacks) and
its streams' order; must not choose paths (planner.py) or issue one-call chunks (one_call.py).

Ordering with the engine: a store's gathers and everything after them wait for the engine's stream, and it gives
the engine's memory back after its last gather (the copies to the host read staging); so does a load issued while
that stream is idle. A load issued while it is busy copies into staging at once (only kvport's buffers
are touched) and only its scatters wait, so the engine's next work waits for the scatters alone when the copies
finished during its current work (``run``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvport.hal.transfer.pieces import stream_pieces

if TYPE_CHECKING:
    import torch

    from kvport.layouts.descriptor import CopyDescriptor

# Most chunks one stacked launch moves (bounds the segment table a stack compiles; 64 x 9 MiB MLA chunks already
# exceed the 256 MiB piece).
MAX_STACK = 64


@dataclasses.dataclass(frozen=True)
class _Work:
    """What one kernel launch moves through one staging piece: a piece of a chunk (large chunks) or a stack of whole
    chunks (kvport.hal.transfer.stacking), its block ids, and where its bytes go on the host."""

    sub: CopyDescriptor
    block_ids: Sequence
    flat_ids: object  # device block-id table for the backend, or None
    hosts: tuple  # (host tensor, its offset in the staging piece) per destination
    nbytes: int

    def to_hosts(self, buf) -> None:
        for host, offset in self.hosts:
            host.copy_(buf[offset : offset + host.numel()], non_blocking=True)

    def from_hosts(self, buf) -> None:
        for host, offset in self.hosts:
            buf[offset : offset + host.numel()].copy_(host, non_blocking=True)


class StagedPipeline:
    """The staged path of one Transfer: its streams, backend and cost model; ``memo`` is the Transfer's memoizer
    (host work per descriptor). Not thread-safe, like the Transfer."""

    def __init__(self, platform, device, backend, model, kernel_stream, dma_stream, memo: Callable) -> None:
        self.platform, self.device, self.backend, self.model = platform, device, backend, model
        self.kernel_stream, self.dma_stream, self.memo = kernel_stream, dma_stream, memo
        self._staging: list[torch.Tensor] = []
        # Per staging buffer, an event after the last queued work that uses it (None: unused), and where the next
        # move's ring starts: moves rotate through the buffers, so a load issued while an earlier load's scatters
        # still wait for the engine copies into other buffers at once (``_early_load``).
        self._last_use: list = []
        self._cursor = 0
        self._retired: list = []  # (grown-out buffer, events after its last uses): freed once they have run
        self._pieces: dict = {}
        self._stacks: dict = {}

    def run(self, direction: str, descriptor, chunks: Sequence, num_tokens: int, keep: list, engine=None):
        """Queue the move; ``engine``: an event the move must follow (the engine's work that wrote or still reads
        the blocks), or None when there is nothing to wait for. Returns (the stream whose last operation ends the
        move, an event after which it no longer touches engine memory, or None: its end)."""
        if direction == "h2d" and engine is not None:
            return self._early_load(descriptor, chunks, num_tokens, keep, engine), None
        if engine is not None:
            self.kernel_stream.wait_event(engine)
            self.dma_stream.wait_event(engine)
        done, released = self._ordered(direction, descriptor, chunks, num_tokens, keep)
        if direction == "d2h" and done is self.dma_stream:  # gathers into pieces, copied out after them
            released = self.platform.new_event()
            released.record(self.kernel_stream)
        return done, released

    def _early_load(self, descriptor, chunks, num_tokens, keep, engine):
        """A load while the engine's stream is busy: block ids up and staging reserved first, the copies into
        staging on the DMA stream after earlier moves are done with the buffers it takes (not after the engine, nor
        after moves on other buffers), the scatters on the kernel stream after the engine and each piece's copy."""
        work = self._work(descriptor, chunks, num_tokens, keep)  # uploads ids on the kernel stream, before its wait
        indices, bufs = self._take(len(work), max(w.nbytes for w in work))
        # Earlier moves' kernels on these buffers (scatters reading, gathers writing them) precede this move's copies
        # into them; earlier copies are ahead on the DMA stream itself. Other buffers' users are not waited for.
        for index in indices:
            if self._last_use[index] is not None:
                self.dma_stream.wait_event(self._last_use[index])
        self.kernel_stream.wait_event(engine)
        self._pipeline("h2d", work, bufs, num_tokens, keep)
        self._used(indices, self.kernel_stream)
        return self.kernel_stream

    def piece_list(self, descriptor, num_tokens: int) -> list:
        """The pieces a chunk of ``num_tokens`` is cut into (the cost model's piece size), memoized."""
        piece = self.model.piece_bytes_for(descriptor.canonical_bytes(num_tokens))
        return self.memo(
            self._pieces, (num_tokens, piece), descriptor, lambda: stream_pieces(descriptor, num_tokens, piece)
        )

    def _take(self, pieces: int, nbytes: int) -> tuple[list[int], list]:
        """The ring of a move of ``pieces`` pieces: up to ``staging_buffers`` buffers of ``nbytes``, the next ones in
        rotation (their indices and tensors)."""
        count = self.model.staging_buffers
        ring = min(pieces, count)
        indices = [(self._cursor + j) % count for j in range(ring)]
        self._cursor = (self._cursor + ring) % count
        return indices, [self._stage(i, nbytes) for i in indices]

    def _used(self, indices: list[int], stream) -> None:
        """These buffers are in use until ``stream``'s work queued so far has run."""
        event = self.platform.new_event()
        event.record(stream)
        for index in indices:
            self._last_use[index] = event

    def _stage(self, index: int, nbytes: int):
        import torch

        while len(self._staging) <= index:
            self._staging.append(torch.empty(0, dtype=torch.uint8, device=self.device))
            self._last_use.append(None)
        if self._staging[index].numel() < nbytes:
            # Queued side-stream work may still use the old buffer: it stays referenced until its last use ran, so
            # growing never waits on the host (a wait here held the engine's thread behind its own forward). The new
            # one is allocated on the DMA stream: the caching allocator hands a stream memory that stream's own order
            # makes safe, and memory the engine's stream just freed is not safe for an early load's copies, which do
            # not wait for the engine.
            old, used = self._staging[index], self._last_use[index]
            if old.numel():
                self._retired.append((old, [used] if used is not None else self._now_on_both()))
            with self.platform.stream_scope(self.dma_stream):
                self._staging[index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._last_use[index] = None
        self._retired = [(old, events) for old, events in self._retired if not all(e.query() for e in events)]
        return self._staging[index]

    def _now_on_both(self) -> list:
        """Events after everything queued so far on both side streams."""
        events = [self.platform.new_event(), self.platform.new_event()]
        events[0].record(self.kernel_stream)
        events[1].record(self.dma_stream)
        return events

    def _work(self, descriptor, chunks, num_tokens, keep) -> list[_Work]:
        """The launches of a transfer, in order, with one upload of every chunk's block table. Chunks smaller than a
        piece are stacked, up to a piece's worth per launch; larger ones are split into pieces of streams."""
        import torch

        from kvport.hal.transfer.segments import flat_block_ids
        from kvport.hal.transfer.stacking import stacked_block_ids

        flat, joined, sizes = [None] * len(chunks), None, []
        if getattr(self.backend, "accepts_flat_ids", False):
            pinned = len(chunks) == 1  # one table: built page-locked, no joining copy
            tables = [flat_block_ids(descriptor, block_ids, num_tokens, pin_memory=pinned) for block_ids, _ in chunks]
            # From pinned memory without a host sync, so the launches below stay queued behind it on the stream.
            with self.platform.stream_scope(self.kernel_stream):
                host_ids = tables[0] if pinned else torch.cat(tables).pin_memory()
                joined = host_ids.to(self.device, non_blocking=True)
            keep.append(joined)
            sizes = [t.numel() for t in tables]
            flat = [joined] if pinned else list(torch.split(joined, sizes))
        chunk_bytes = descriptor.canonical_bytes(num_tokens)
        # Stacks up to a full ``piece_bytes``, not CostModel.piece_bytes_for's smaller pieces: for 32 DeepSeek-V4
        # chunks (191 MiB) four stacks instead of one gained alone (0.91 -> 0.92-0.94 of memcpy) but lost under
        # load (0.69-0.72 -> 0.54-0.55: every launch waits for SMs the GEMM holds). H200, one run, 2026-11-29.
        per_launch = min(MAX_STACK, self.model.piece_bytes // max(chunk_bytes, 1))
        if len(chunks) > 1 and per_launch > 1:
            work, first, start = [], 0, 0  # start: where chunk ``first``'s ids begin in ``joined``
            while first < len(chunks):
                group = chunks[first : first + per_launch]
                k = len(group)
                ids = None
                if joined is not None:
                    end = start + sum(sizes[first : first + k])
                    ids, start = joined[start:end], end
                stacked = self._stacked(descriptor, k)
                hosts = tuple((host[:chunk_bytes], j * chunk_bytes) for j, (_, host) in enumerate(group))
                block_ids = stacked_block_ids(descriptor, [b for b, _ in group])
                work.append(_Work(stacked, block_ids, ids, hosts, k * chunk_bytes))
                first += k
            return work
        pieces = self.piece_list(descriptor, num_tokens)
        return [
            _Work(sub, block_ids, ids, ((host[offset : offset + nbytes], 0),), nbytes)
            for (block_ids, host), ids in zip(chunks, flat)
            for sub, offset, nbytes in pieces
        ]

    def _stacked(self, descriptor, copies: int):
        from kvport.hal.transfer.stacking import stack

        return self.memo(self._stacks, (copies,), descriptor, lambda: stack(descriptor, copies))

    def _kernel(self, direction, work: _Work, buf, num_tokens, keep: list) -> None:
        enqueue = getattr(self.backend, "enqueue", None)
        if enqueue is not None:  # no per-launch completion: the move records one event for all of its work
            blocks = enqueue(work.sub, work.block_ids, buf, num_tokens, direction == "d2h", flat_ids=work.flat_ids)
            if blocks is not None and blocks is not work.flat_ids:
                keep.append(blocks)
        elif direction == "d2h":
            self.backend.gather(work.sub, work.block_ids, buf, num_tokens)
        else:
            self.backend.scatter(buf, work.sub, work.block_ids, num_tokens)

    def _ordered(self, direction, descriptor, chunks, num_tokens, keep):
        """Both streams already wait for the engine: ``staging_buffers`` device buffers in a ring, kernels fill
        pieces ahead while the copy engine drains. Returns (the stream whose last operation ends the transfer,
        the event after its gather where one piece's gather and copy share a stream, else None)."""
        # The staging buffers outlive a call: a transfer issued before this one may still be copying out of them
        # (d2h, on the DMA stream) or scattering from them (h2d, on the kernel stream) when this one starts.
        self.kernel_stream.wait_stream(self.dma_stream)
        work = self._work(descriptor, chunks, num_tokens, keep)
        indices, bufs = self._take(len(work), max(w.nbytes for w in work))
        if len(work) == 1:
            # One piece: kernel and copy on one stream, so a small transfer (a 256-token chunk: 0.6 ms of link
            # time) pays no cross-stream event waits between its kernel and its copy.
            buf = bufs[0][: work[0].nbytes]
            released = None
            with self.platform.stream_scope(self.kernel_stream):
                if direction == "h2d":
                    work[0].from_hosts(buf)
                self._kernel(direction, work[0], buf, num_tokens, keep)
                if direction == "d2h":
                    # The engine's blocks are read once the gather ran; the copy after it reads staging only.
                    released = self.platform.new_event()
                    released.record(self.kernel_stream)
                    work[0].to_hosts(buf)
            self._used(indices, self.kernel_stream)
            return self.kernel_stream, released
        self.dma_stream.wait_stream(self.kernel_stream)
        drain = self._pipeline(direction, work, bufs, num_tokens, keep)
        self._used(indices, drain)
        return drain, None

    def _pipeline(self, direction, work, bufs, num_tokens, keep):
        """The ring: per piece the fill stream fills a slot, the drain stream drains it, events hand slots over.
        Returns the drain stream (its last operation ends the move)."""
        ring = len(bufs)
        freed: list = [None] * ring  # event: ring slot i is free again
        # d2h: kernel fills a slot, the copy engine drains it; h2d: the copy engine fills, the kernel drains.
        fill, drain = (
            (self.kernel_stream, self.dma_stream) if direction == "d2h" else (self.dma_stream, self.kernel_stream)
        )
        for k, item in enumerate(work):
            slot = k % ring
            buf = bufs[slot][: item.nbytes]
            if freed[slot] is not None:
                fill.wait_event(freed[slot])
            with self.platform.stream_scope(fill):
                if direction == "d2h":
                    self._kernel(direction, item, buf, num_tokens, keep)
                else:
                    item.from_hosts(buf)
            filled = self.platform.new_event()
            filled.record(fill)
            drain.wait_event(filled)
            with self.platform.stream_scope(drain):
                if direction == "d2h":
                    item.to_hosts(buf)
                else:
                    self._kernel(direction, item, buf, num_tokens, keep)
            freed[slot] = self.platform.new_event()
            freed[slot].record(drain)
        # The fill stream's last operation precedes the last drain through the events above.
        return drain
