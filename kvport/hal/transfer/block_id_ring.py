"""Block ids on their way to the device for one-call staged chunks: page-locked host slots and one device buffer.
Owns when a slot may be rewritten (after the event that guards its last upload); must not launch kernels or choose
paths."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Chunks in flight before the host waits for the oldest one's upload (the cache keeps a few stores and loads in
# flight per engine step).
SLOTS = 8


class BlockIdRing:
    """Every upload is issued on ``stream``: the device buffer is reused in stream order (a chunk's upload runs
    after the previous chunk's kernels read the buffer), a host slot only after the event that guards its last
    upload. The ring, not a transfer's keepalive, guards the slots, so a caller that drops a result unwaited cannot
    free ids still to be uploaded. Protocol per upload: ``take``, issue the upload on the stream (the native call
    writes the ids into the slot), then ``guard`` with an event recorded on the stream after it, also when the
    call failed (part of it may be queued)."""

    def __init__(self, platform, device, stream) -> None:
        import torch

        self.platform, self.device, self.stream = platform, device, stream
        self._host = [torch.empty(0, dtype=torch.int64) for _ in range(SLOTS)]
        self._uploaded: list[Any] = [None] * SLOTS  # per slot: the event guarding its last upload, or None
        self._next = 0
        self._device = torch.empty(0, dtype=torch.int64, device=device)

    def take(self, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(slot number, its page-locked buffer of room for >= ``n`` ids, the device buffer of room for >= ``n``),
        both free to rewrite now."""
        import torch

        k = self._next
        self._next = (k + 1) % SLOTS
        uploaded = self._uploaded[k]
        if uploaded is not None:
            self._uploaded[k] = None
            uploaded.synchronize()  # returns at once unless more chunks are in flight than slots
        if self._host[k].numel() < n:
            self._host[k] = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        if self._device.numel() < n:
            self.stream.synchronize()  # queued chunks may still read the old buffer
            self._device = torch.empty(max(n, 2 * self._device.numel()), dtype=torch.int64, device=self.device)
        return k, self._host[k], self._device

    def guard(self, k: int, event) -> None:
        """Slot ``k`` is rewritten only after ``event`` (recorded on the stream after the slot's upload)."""
        self._uploaded[k] = event
