"""Block ids on their way to the device for one-call staged chunks: page-locked host slots and one device buffer.
Owns when a slot may be rewritten (after the event of its last upload); must not launch kernels or choose paths."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Chunks in flight before the host waits for the oldest one's upload (the cache keeps a few stores and loads in
# flight per engine step).
SLOTS = 8


class BlockIdRing:
    """Every upload is issued on ``stream``: the device buffer is reused in stream order (a chunk's upload runs
    after the previous chunk's kernels read the buffer), a host slot only after its upload ran. The ring, not a
    transfer's keepalive, guards the slots, so a caller that drops a result unwaited cannot free ids still to be
    uploaded."""

    def __init__(self, platform, device, stream) -> None:
        import torch

        self.platform, self.device, self.stream = platform, device, stream
        self._host = [torch.empty(0, dtype=torch.int64) for _ in range(SLOTS)]
        self._uploaded: list[Any] = [None] * SLOTS  # per slot: event after its last upload, or None
        self._next = 0
        self._device = torch.empty(0, dtype=torch.int64, device=device)

    @contextlib.contextmanager
    def slot(self, ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(page-locked copy of ``ids``, device buffer of the same length) for one upload issued on the stream
        inside the block; the slot's event is recorded on the stream when the block ends."""
        import torch

        k = self._next
        self._next = (k + 1) % SLOTS
        if self._uploaded[k] is not None:
            self._uploaded[k].synchronize()  # rare: more chunks in flight than slots
            self._uploaded[k] = None
        n = ids.numel()
        if self._host[k].numel() < n:
            self._host[k] = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        if self._device.numel() < n:
            self.stream.synchronize()  # queued chunks may still read the old buffer
            self._device = torch.empty(max(n, 2 * self._device.numel()), dtype=torch.int64, device=self.device)
        host = self._host[k][:n]
        host.copy_(ids)
        try:
            yield host, self._device[:n]
        finally:  # also after a failed call: part of it may already be queued
            event = self.platform.new_event()
            event.record(self.stream)
            self._uploaded[k] = event
