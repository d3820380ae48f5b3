"""Shared front of the kernel backends (triton, cuda, hip) that copy through segment tables on one device.
Owns the gather/scatter entry points, the chunk check and the block-id table; must not launch kernels itself."""

from __future__ import annotations

from kvport.hal.backend import Backend, Verdict
from kvport.hal.completion import READY, Completion, completion_after
from kvport.hal.transfer.segments import check_buffer
from kvport.hal.transfer.tables import device_block_ids


class SegmentedBackend(Backend):
    """Subclasses implement ``_launch``; everything before the launch is the same for every kernel backend."""

    # Transfer may pass one device copy of the flat block ids to every piece of a staged transfer.
    accepts_flat_ids = True

    def _one_device(self, descriptor):
        """(the one device every stream lives on, None) or (None, a refusal saying why there is none)."""
        if not descriptor.streams:
            return None, Verdict.no(f"{descriptor.layout}: descriptor has no streams")
        devices = {s.buffer.device for s in descriptor.streams}
        if len(devices) != 1:
            return None, Verdict.no(f"{descriptor.layout}: streams span several devices ({sorted(map(str, devices))})")
        return next(iter(devices)), None

    def gather(
        self, descriptor, block_ids, dst, num_tokens, max_programs: int | None = None, flat_ids=None
    ) -> Completion:
        return self._run(descriptor, block_ids, dst, num_tokens, True, max_programs, flat_ids)

    def scatter(
        self, src, descriptor, block_ids, num_tokens, max_programs: int | None = None, flat_ids=None
    ) -> Completion:
        return self._run(descriptor, block_ids, src, num_tokens, False, max_programs, flat_ids)

    def _run(self, descriptor, block_ids, chunk, num_tokens, gather, max_programs, flat_ids) -> Completion:
        blocks = self.enqueue(descriptor, block_ids, chunk, num_tokens, gather, max_programs, flat_ids)
        if blocks is None:
            return READY
        return completion_after(descriptor.streams[0].buffer.device, (chunk, blocks))

    def enqueue(self, descriptor, block_ids, chunk, num_tokens, gather, max_programs=None, flat_ids=None):
        """The gather (``gather``) or scatter queued on the current stream, without a completion of its own: for a
        caller that orders and completes the work itself (the transfer pipelines, which record one event per move;
        an event per launch cost ~6 us of host time). Returns the block-id tensor the kernels read (keep it alive
        until they ran), or None when there was nothing to queue."""
        device = descriptor.streams[0].buffer.device
        name = "gather dst" if gather else "scatter src"
        check_buffer(name, chunk, descriptor.canonical_bytes(num_tokens), engine_device=device)
        if num_tokens <= 0:
            return None
        blocks = flat_ids if flat_ids is not None else device_block_ids(descriptor, block_ids, num_tokens, device)
        self._launch(descriptor, chunk, num_tokens, blocks, gather, max_programs, device)
        return blocks

    def _launch(self, descriptor, chunk, num_tokens, blocks, gather, max_programs, device) -> None:
        raise NotImplementedError
