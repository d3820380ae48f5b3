"""Byte views of engine memory for the pure-torch reference ops, built only from a stream's strides.
Owns the descriptor -> (rows tensor, slot index) translation; must not copy data or know layouts by name."""

from __future__ import annotations

import torch

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``tensor`` as a flat uint8 tensor on the same device."""
    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    raw.set_(tensor.untyped_storage())
    return raw


def slot_index(group: GroupDesc, table: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, in-block slot) for every slot the first ``num_tokens`` tokens touch, in canonical order.
    ``table`` is the group's checked table from ``CopyDescriptor.block_tables``."""
    slots = torch.arange(group.slot_count(num_tokens), dtype=torch.int64)
    spb = group.slots_per_block
    return table[slots // spb], slots % spb


def stream_rows(stream: StreamDesc, group: GroupDesc, max_block: int) -> torch.Tensor:
    """A [blocks, slots_per_block, rows_per_slot, row_bytes] byte view of one stream, blocks 0..max_block."""
    raw = storage_bytes(stream.buffer)
    start = stream.buffer.storage_offset() * stream.buffer.element_size() + stream.offset
    return raw.as_strided(
        (max_block + 1, group.slots_per_block, stream.rows_per_slot, stream.row_bytes),
        (stream.block_stride, stream.slot_stride, stream.row_stride, 1),
        start,
    )


def per_group_ids(descriptor: CopyDescriptor, block_ids, num_tokens: int):
    """Per group, the (blocks, slots) index pair; the block tables are checked once per call."""
    tables = descriptor.block_tables(block_ids, num_tokens)
    return [slot_index(group, table, num_tokens) for group, table in zip(descriptor.groups, tables)]


def addressed_streams(descriptor: CopyDescriptor, block_ids, num_tokens: int):
    """Yield (canonical offset, row view, (blocks, slots) on the view's device) for each stream with slots to move.

    The index, its highest block and its copy to a device are made once per group, not once per stream."""
    index = per_group_ids(descriptor, block_ids, num_tokens)
    top = [int(blocks.max()) if blocks.numel() else -1 for blocks, _ in index]
    on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    for stream, offset in zip(descriptor.streams, descriptor.stream_offsets(num_tokens)):
        blocks, slots = index[stream.group]
        if blocks.numel() == 0:
            continue
        view = stream_rows(stream, descriptor.groups[stream.group], top[stream.group])
        key = (stream.group, view.device)
        if key not in on_device:
            on_device[key] = (blocks.to(view.device), slots.to(view.device))
        yield offset, view, on_device[key]
