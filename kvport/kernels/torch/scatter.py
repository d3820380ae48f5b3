"""Reference scatter: canonical chunk bytes -> engine memory, in plain torch indexing.
The oracle every other backend is compared to; must write only the addressed slots."""

from __future__ import annotations

import torch

from kvport.kernels.torch.views import per_group_ids, stream_rows
from kvport.layouts.descriptor import CopyDescriptor


def scatter(src: torch.Tensor, descriptor: CopyDescriptor, block_ids, num_tokens: int) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    if src.dtype != torch.uint8 or src.numel() < need:
        raise ValueError(f"scatter: src must be uint8 with >= {need} bytes, got {src.dtype} x {src.numel()}")
    index = per_group_ids(descriptor, block_ids, num_tokens)
    for stream, offset in zip(descriptor.streams, descriptor.stream_offsets(num_tokens)):
        blocks, slots = index[stream.group]
        if blocks.numel() == 0:
            continue
        view = stream_rows(stream, descriptor.groups[stream.group], int(blocks.max()))
        shape = (blocks.numel(), stream.rows_per_slot, stream.row_bytes)
        rows = src[offset : offset + blocks.numel() * stream.slot_bytes].view(shape).to(view.device)
        view[blocks.to(view.device), slots.to(view.device)] = rows
