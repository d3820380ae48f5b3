"""Reference scatter: canonical chunk bytes -> engine memory, in plain torch indexing.
The oracle every other backend is compared to; must write only the addressed slots."""

from __future__ import annotations

import math

import torch

from kvport.kernels.torch.views import addressed_streams
from kvport.layouts.descriptor import CopyDescriptor


def scatter(src: torch.Tensor, descriptor: CopyDescriptor, block_ids, num_tokens: int) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    if src.dtype != torch.uint8 or src.numel() < need:
        raise ValueError(f"scatter: src must be uint8 with >= {need} bytes, got {src.dtype} x {src.numel()}")
    for offset, view, index in addressed_streams(descriptor, block_ids, num_tokens):
        shape = (index[0].numel(), *view.shape[2:])  # [slots, rows_per_slot, row_bytes]
        rows = src[offset : offset + math.prod(shape)].view(shape).to(view.device)
        view[index] = rows
