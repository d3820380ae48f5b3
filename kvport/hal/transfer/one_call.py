"""One-call staged chunks: a chunk that fits one staging piece, issued by the native backend in one call that also
orders it after the engine's stream. Owns the block-id ring, two staging slots and their events; must not choose
paths or touch the general staged pipeline's buffers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvport.hal.transfer.block_id_ring import BlockIdRing
from kvport.hal.transfer.segments import flat_block_id_list

if TYPE_CHECKING:
    import torch

# Staging slots the chunks alternate between: the next chunk's kernels fill one while the copy engine drains the
# other (gather; the other way round for scatter). Two suffice: per chunk the kernels take a fraction of the copy.
STAGING_SLOTS = 2


class OneCallChunks:
    """Issues one-call chunks: kernels on ``kernel_stream``, host copies on ``copy_stream``. One native call per
    chunk: block ids written and uploaded, a wait for the engine's current stream (if it has work queued) and for
    the slot's previous reader, kernels, the host copy; events hand the slot between the two streams. The same
    kernels and copies as the general staged path with one piece, without its ~60 Python-level calls (a one-chunk
    store was host-bound for MLA and DeepSeek V4, H200, docs/performance.md), and consecutive chunks overlap.
    Not thread-safe, like the Transfer that owns it."""

    def __init__(self, platform, device: torch.device, kernel_stream, copy_stream) -> None:
        import torch

        self.platform, self.device = platform, device
        self.kernel_stream, self.copy_stream = kernel_stream, copy_stream
        self.ring = BlockIdRing(platform, device, kernel_stream)
        self._streams = (platform.stream_handle(kernel_stream), platform.stream_handle(copy_stream))
        # Reusable events (a stream wait keeps the record it saw, so recording one again later is safe), recorded
        # once here because the platform creates events lazily, at their first record; a fresh slot's "freed" is
        # thereby already complete.
        self._events = [platform.new_event() for _ in range(1 + 2 * STAGING_SLOTS)]  # kept: calls use raw handles
        for event in self._events:
            event.record(kernel_stream)
        handles = [platform.event_handle(event) for event in self._events]
        self._after_event = handles[0]
        self._slot_events = [(handles[1 + 2 * s], handles[2 + 2 * s]) for s in range(STAGING_SLOTS)]  # filled, freed
        self._slots = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(STAGING_SLOTS)]
        self._next_slot = 0

    def issue(self, backend, descriptor, chunk: tuple, num_tokens: int, direction: str, after=None):
        """Queue one (block ids, host buffer) ``chunk``; returns (the event that ends it, which also guards the
        chunk's block-id slot; the event after which it no longer touches engine memory; the stream the first was
        recorded on). ``after``: the caller ordered the kernel stream itself (Transfer.move's explicit ``after``);
        None: the call waits for the engine's current stream."""
        block_ids, host = chunk
        ids = flat_block_id_list(descriptor, block_ids, num_tokens)
        slot = self._slot(descriptor.canonical_bytes(num_tokens))
        ids_slot, ids_host, ids_dev = self.ring.take(len(ids))
        ordering = (self.platform.current_stream_handle(self.device.index), self._after_event)
        gather = direction == "d2h"
        try:
            backend.staged_chunk(
                descriptor,
                num_tokens,
                ids,
                ids_host,
                ids_dev,
                self._slots[slot],
                host,
                gather,
                self._streams,
                self._slot_events[slot],
                ordering if after is None else (0, 0),
            )
        finally:  # also after a failed call: part of it may already be queued
            done = self.platform.new_event()
            done.record(self.copy_stream if gather else self.kernel_stream)
            self.ring.guard(ids_slot, done)
        end_stream = self.copy_stream if gather else self.kernel_stream
        if not gather:
            return done, done, end_stream
        # A gather is done with engine memory once the slot is filled: the slot's own reusable "filled" event. A
        # wait issued after a later chunk on this slot recorded it again waits for that chunk's gather instead,
        # which ran after this one on the same stream: longer, never too short.
        return done, self._events[1 + 2 * slot], end_stream

    def _slot(self, nbytes: int) -> int:
        import torch

        slot = self._next_slot
        self._next_slot = (slot + 1) % STAGING_SLOTS
        if self._slots[slot].numel() < nbytes:
            # Queued chunks may still use the old buffer: let them finish before it is freed.
            self.kernel_stream.synchronize()
            self.copy_stream.synchronize()
            self._slots[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return slot
