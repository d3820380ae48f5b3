"""Region lists for the DMA path: every contiguous (engine address, chunk address, bytes) run of a transfer.
Owns region enumeration and merging of touching runs; must not issue copies or choose a path."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.transfer.segments import flat_block_ids, group_block_offsets, merge_stream

if TYPE_CHECKING:
    import torch

    from kvport.layouts.descriptor import CopyDescriptor


def region_count(descriptor: CopyDescriptor, num_tokens: int) -> int:
    """Regions before merging neighbours (what the cost model charges per-region overhead for)."""
    total = 0
    for stream in descriptor.streams:
        group = descriptor.groups[stream.group]
        merged = merge_stream(stream, group)
        total += merged.super_count(group, num_tokens) * merged.rows
    return total


@dataclasses.dataclass(frozen=True)
class RegionTemplate:
    """Every region of one (descriptor, num_tokens) with the block ids and the chunk address left open: per region
    its engine address without the block term, which flat block-id entry and stride it adds, its offset in the chunk
    and its size (int64 CPU tensors). Built once; ``fill`` then costs a few vector operations per transfer (building
    regions from scratch per call cost more host time than a 256-token chunk's copy takes)."""

    eng_base: torch.Tensor
    block_pos: torch.Tensor
    block_stride: torch.Tensor
    can_off: torch.Tensor
    size: torch.Tensor

    def fill(self, flat_ids: torch.Tensor, chunk_ptr: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(engine addresses, chunk addresses, sizes) for these block ids and this chunk, touching runs merged."""
        eng = self.eng_base + flat_ids[self.block_pos] * self.block_stride
        return merge_touching(eng, self.can_off + chunk_ptr, self.size)


def region_template(descriptor: CopyDescriptor, num_tokens: int) -> RegionTemplate:
    import torch

    offsets = descriptor.stream_offsets(num_tokens)
    block_offsets = group_block_offsets(descriptor, num_tokens)
    parts: list[list[torch.Tensor]] = [[], [], [], [], []]
    for stream, offset in zip(descriptor.streams, offsets):
        group = descriptor.groups[stream.group]
        m = merge_stream(stream, group)
        supers = m.super_count(group, num_tokens)
        length = descriptor.stream_bytes(stream, num_tokens)
        if supers == 0 or length == 0:
            continue
        s = torch.arange(supers, dtype=torch.int64)
        r = torch.arange(m.rows, dtype=torch.int64)
        base = stream.base_ptr + (s % m.super_per_block) * m.slot_stride
        eng = (base[:, None] + r[None, :] * m.row_stride).reshape(-1)
        pos = (block_offsets[stream.group] + s // m.super_per_block)[:, None].expand(supers, m.rows).reshape(-1)
        start = (s[:, None] * m.rows + r[None, :]).reshape(-1) * m.row_len
        size = (length - start).clamp(0, m.row_len)
        keep = size > 0
        for part, value in zip(parts, (eng, pos, torch.full_like(eng, stream.block_stride), offset + start, size)):
            part.append(value[keep])
    if not parts[0]:
        empty = torch.zeros(0, dtype=torch.int64)
        return RegionTemplate(empty, empty, empty, empty, empty)
    return RegionTemplate(*(torch.cat(p).contiguous() for p in parts))


def regions(
    descriptor: CopyDescriptor, block_ids: Sequence, num_tokens: int, chunk_ptr: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(engine addresses, chunk addresses, sizes) as int64 CPU tensors, touching runs merged, canonical order."""
    return region_template(descriptor, num_tokens).fill(flat_block_ids(descriptor, block_ids, num_tokens), chunk_ptr)


def merge_touching(
    eng: torch.Tensor, can: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join region i+1 onto region i where both sides continue exactly (consecutive block ids, say)."""
    import torch

    if size.numel() <= 1:
        return eng, can, size
    joins = (eng[:-1] + size[:-1] == eng[1:]) & (can[:-1] + size[:-1] == can[1:])
    starts = torch.ones_like(size, dtype=torch.bool)
    starts[1:] = ~joins
    group = torch.cumsum(starts.to(torch.int64), 0) - 1
    merged = torch.zeros(int(group[-1]) + 1, dtype=torch.int64).index_add_(0, group, size)
    return eng[starts].contiguous(), can[starts].contiguous(), merged
