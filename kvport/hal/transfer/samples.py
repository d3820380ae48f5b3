"""Hand-built copy descriptors covering every stride shape the kernels must handle, for kernel tests.
Owns only small synthetic engine buffers; must not stand in for kvport.layouts' catalog in user-facing output."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Dims:
    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    block: int = 4
    blocks: int = 9
    elem: int = 2  # bytes per value (bf16)


def _rand(nbytes: int, device, generator) -> torch.Tensor:
    import torch

    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).to(device)


def nhd(d: Dims, device="cpu", generator=None) -> CopyDescriptor:
    """vLLM flash-attn: per layer [2, blocks, block, heads, head_dim]; a slot is one contiguous row."""
    row = d.heads * d.head_dim * d.elem
    streams = []
    for layer in range(d.layers):
        buf = _rand(2 * d.blocks * d.block * row, device, generator)
        for kv in range(2):
            streams.append(
                StreamDesc(0, layer, "kv"[kv], buf, kv * d.blocks * d.block * row, d.block * row, row, row, 1, row)
            )
    return CopyDescriptor("nhd", (GroupDesc(0, "full", d.block),), tuple(streams), "nhd")


def hnd(d: Dims, device="cpu", generator=None) -> CopyDescriptor:
    """Heads before tokens: per layer [2, blocks, heads, block, head_dim]; a slot is `heads` strided rows."""
    hrow = d.head_dim * d.elem
    streams = []
    for layer in range(d.layers):
        buf = _rand(2 * d.blocks * d.heads * d.block * hrow, device, generator)
        kv_size = d.blocks * d.heads * d.block * hrow
        for kv in range(2):
            streams.append(
                StreamDesc(
                    0, layer, "kv"[kv], buf, kv * kv_size, d.heads * d.block * hrow, hrow, d.block * hrow, d.heads, hrow
                )
            )
    return CopyDescriptor("hnd", (GroupDesc(0, "full", d.block),), tuple(streams), "hnd")


def packed(d: Dims, device="cpu", generator=None) -> CopyDescriptor:
    """One buffer for all layers, K|V interleaved per slot, padded rows: [blocks, layers, block, 2, heads*hd+pad]."""
    row = d.heads * d.head_dim * d.elem
    pad = 16
    slot = 2 * (row + pad)
    layer_stride = d.block * slot
    buf = _rand(d.blocks * d.layers * layer_stride, device, generator)
    streams = []
    for layer in range(d.layers):
        for kv in range(2):
            streams.append(
                StreamDesc(
                    0,
                    layer,
                    "kv"[kv],
                    buf,
                    layer * layer_stride + kv * (row + pad),
                    d.layers * layer_stride,
                    slot,
                    row,
                    1,
                    row,
                )
            )
    return CopyDescriptor("packed", (GroupDesc(0, "full", d.block),), tuple(streams), "packed")


def mla_odd(d: Dims, device="cpu", generator=None) -> CopyDescriptor:
    """MLA latent plus a narrow odd-sized plane (scales), two groups with different block sizes and a
    compressed group (4 tokens per slot), and an opaque group: exercises every width class and masking."""
    latent = 576 * d.elem
    streams = []
    groups = (
        GroupDesc(0, "mla", d.block),
        GroupDesc(1, "compressed", 2 * d.block, tokens_per_slot=4),
        GroupDesc(2, "opaque", d.block, opaque=True),
    )
    for layer in range(d.layers):
        buf = _rand(d.blocks * d.block * latent, device, generator)
        streams.append(StreamDesc(0, layer, "latent", buf, 0, d.block * latent, latent, latent, 1, latent))
        scales = _rand(d.blocks * d.block * 6, device, generator)
        streams.append(StreamDesc(0, layer, "scale", scales, 0, d.block * 6, 6, 6, 1, 6))
    spb = (2 * d.block) // 4
    for layer in range(d.layers):
        buf = _rand(d.blocks * spb * 3 * 40 + 16, device, generator)
        streams.append(StreamDesc(1, layer, "c", buf, 8, spb * 3 * 40, 3 * 40, 40, 3, 36))
    opaque_block = d.block * 20
    buf = _rand(d.blocks * opaque_block, device, generator)
    streams.append(StreamDesc(2, 0, "blob", buf, 0, opaque_block, opaque_block, opaque_block, 1, opaque_block))
    return CopyDescriptor("mla_odd", groups, tuple(streams), "mla_odd")


SAMPLES = {"nhd": nhd, "hnd": hnd, "packed": packed, "mla_odd": mla_odd}


def sample(name: str, dims: Dims | None = None, device="cpu", seed: int = 0) -> CopyDescriptor:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return SAMPLES[name](dims or Dims(), device, generator)
