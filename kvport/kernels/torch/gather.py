"""Reference gather: engine memory -> canonical chunk bytes, in plain torch indexing.
The oracle every other backend is compared to; must stay obviously correct rather than fast."""

from __future__ import annotations

import torch

from kvport.kernels.torch.views import per_group_ids, stream_rows
from kvport.layouts.descriptor import CopyDescriptor


def gather(descriptor: CopyDescriptor, block_ids, dst: torch.Tensor, num_tokens: int) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    if dst.dtype != torch.uint8 or dst.numel() < need:
        raise ValueError(f"gather: dst must be uint8 with >= {need} bytes, got {dst.dtype} x {dst.numel()}")
    index = per_group_ids(descriptor, block_ids, num_tokens)
    for stream, offset in zip(descriptor.streams, descriptor.stream_offsets(num_tokens)):
        blocks, slots = index[stream.group]
        if blocks.numel() == 0:
            continue
        view = stream_rows(stream, descriptor.groups[stream.group], int(blocks.max()))
        dev_blocks, dev_slots = blocks.to(view.device), slots.to(view.device)
        rows = view[dev_blocks, dev_slots]
        dst[offset : offset + rows.numel()].view(rows.shape).copy_(rows)
