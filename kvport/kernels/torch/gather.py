"""Reference gather: engine memory -> canonical chunk bytes, in plain torch indexing.
The oracle every other backend is compared to; must stay obviously correct rather than fast."""

from __future__ import annotations

import torch

from kvport.kernels.torch.views import addressed_streams
from kvport.layouts.descriptor import CopyDescriptor


def gather(descriptor: CopyDescriptor, block_ids, dst: torch.Tensor, num_tokens: int) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    if dst.dtype != torch.uint8 or dst.numel() < need:
        raise ValueError(f"gather: dst must be uint8 with >= {need} bytes, got {dst.dtype} x {dst.numel()}")
    for offset, view, index in addressed_streams(descriptor, block_ids, num_tokens):
        rows = view[index]
        dst[offset : offset + rows.numel()].view(rows.shape).copy_(rows)
