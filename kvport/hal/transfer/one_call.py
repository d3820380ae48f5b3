"""One-call staged chunks: a chunk that fits one staging piece, issued by the native backend in one call that also
orders it after the engine's stream. Owns the block-id ring and the ordering events; must not choose paths or own
staging buffers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvport.hal.transfer.block_id_ring import BlockIdRing
from kvport.hal.transfer.segments import flat_block_id_list

if TYPE_CHECKING:
    import torch


class OneCallChunks:
    """Issues one-call chunks on ``kernel_stream``. One native call per chunk: wait for the engine's current stream
    (if it has work queued), wait for ``busy_stream`` (if it may still read staging), block ids written and
    uploaded, kernels, the host copy. The same ordering and kernels as the general staged path with one piece,
    without its ~60 Python-level calls: a one-chunk store is host-bound for MLA and DeepSeek V4 (H200,
    docs/performance.md). Not thread-safe, like the Transfer that owns it."""

    def __init__(self, platform, device: torch.device, kernel_stream, busy_stream) -> None:
        self.platform, self.device = platform, device
        self.kernel_stream = kernel_stream
        self.ring = BlockIdRing(platform, device, kernel_stream)
        self._stream = platform.stream_handle(kernel_stream)
        # Two reusable events: a stream wait keeps the record it saw, so re-recording one later is safe. Recorded
        # once here because the platform creates events lazily, at their first record.
        after, busy = platform.new_event(), platform.new_event()
        after.record(kernel_stream)
        busy.record(kernel_stream)
        self._events = (after, busy)  # kept alive: the native calls use their raw handles
        self._after_event = platform.event_handle(after)
        self._busy = (platform.stream_handle(busy_stream), platform.event_handle(busy))

    def issue(self, backend, descriptor, chunk: tuple, num_tokens: int, staging, direction: str, after=None):
        """Queue one (block ids, host buffer) ``chunk``; returns the event that ends it (it also guards the chunk's
        block-id slot). ``after``: the caller ordered the kernel stream itself (Transfer.move's explicit ``after``);
        None: the call waits for the engine's current stream."""
        block_ids, host = chunk
        ids = flat_block_id_list(descriptor, block_ids, num_tokens)
        slot, ids_host, ids_dev = self.ring.take(len(ids))
        ordering = (self.platform.current_stream_handle(self.device.index), self._after_event)
        try:
            backend.staged_chunk(
                descriptor,
                num_tokens,
                ids,
                ids_host,
                ids_dev,
                staging,
                host,
                direction == "d2h",
                self._stream,
                ordering if after is None else (0, 0),
                self._busy,
            )
        finally:  # also after a failed call: part of it may already be queued
            done = self.platform.new_event()
            done.record(self.kernel_stream)
            self.ring.guard(slot, done)
        return done
