"""Device-resident segment tables for the Triton and native backends, cached per (descriptor, tokens, alignment).
Owns moving compiled plans and block ids to the device; must not launch kernels or choose transfer paths."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.transfer.segments import Launch, SegmentPlan, _width_for, compile_plan, flat_block_ids, scaled_table

if TYPE_CHECKING:
    import torch

    from kvport.layouts.descriptor import CopyDescriptor


@dataclasses.dataclass
class DeviceLaunch:
    launch: Launch
    elem_bytes: int
    vec: int  # elements per 16-byte-or-narrower vector, a hint for Triton
    table: torch.Tensor  # int64 [n, NCOL] on the device

    @property
    def n_streams(self) -> int:
        return len(self.launch.table)


class TableCache:
    """Compiled tables keyed by descriptor identity, token count and the chunk's alignment class.

    Tables depend only on engine memory (fixed for a descriptor) and the chunk's alignment, never on the chunk's
    address, so one transfer size compiles once. Holds the descriptor itself so its id cannot be reused."""

    def __init__(self, anchor_mode: str, max_width: int, size: int = 64) -> None:
        self.anchor_mode = anchor_mode  # "zero": absolute addresses (native); "first": first stream's storage
        self.max_width = max_width
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def anchor(self, descriptor: CopyDescriptor) -> int:
        if self.anchor_mode == "zero":
            return 0
        buf = descriptor.streams[0].buffer
        return buf.untyped_storage().data_ptr()

    def get(
        self, descriptor: CopyDescriptor, num_tokens: int, chunk: torch.Tensor, elem_bytes_for
    ) -> tuple[SegmentPlan, list[DeviceLaunch]]:
        import torch

        anchor = self.anchor(descriptor)
        align = _width_for([chunk.data_ptr() - anchor, self.max_width])
        device = descriptor.streams[0].buffer.device
        key = (id(descriptor), num_tokens, align, str(device))
        hit = self._entries.get(key)
        if hit is not None and hit[0] is descriptor:
            self._entries.move_to_end(key)
            return hit[1], hit[2]
        # Compile as if the chunk sat at an address of the same alignment class: tables hold chunk-relative offsets.
        plan = compile_plan(descriptor, num_tokens, anchor + align, anchor, max_width=min(self.max_width, align))
        launches = []
        for launch in plan.launches:
            elem = elem_bytes_for(launch.width)
            rows = scaled_table(launch, elem)
            table = torch.tensor(rows, dtype=torch.int64).to(device)
            launches.append(DeviceLaunch(launch, elem, max(1, launch.width // elem), table))
        self._entries[key] = (descriptor, plan, launches)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return plan, launches


def device_block_ids(descriptor: CopyDescriptor, block_ids: Sequence, num_tokens: int, device) -> torch.Tensor:
    """Flat block ids for the kernels, on ``device`` (one small host-to-device copy per call)."""
    ids = flat_block_ids(descriptor, block_ids, num_tokens)
    if getattr(device, "type", str(device)) == "cpu":
        return ids
    # From pinned memory without a host sync, so back-to-back launches on a side stream stay queued; torch's
    # pinned allocator keeps the host copy alive until the copy has run.
    return ids.pin_memory().to(device, non_blocking=True)
