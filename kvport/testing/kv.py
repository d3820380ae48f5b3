"""Hand-built copy descriptors and KV tensors for the cache tests (and their subprocess helpers).
Owns only test scaffolding per kvport/layouts/descriptor.py's contract; kvport's runtime code must not import it."""

from __future__ import annotations

import torch

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc


def nhd_kv(num_blocks=32, block_size=16, layers=2, heads=2, head_dim=8, dtype=torch.bfloat16, seed=None):
    """vLLM flash-attn style: per layer one tensor [2 (K/V), blocks, block_size, heads, head_dim]."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    tensors = []
    for _ in range(layers):
        if gen is None:
            t = torch.zeros(2, num_blocks, block_size, heads, head_dim, dtype=dtype)
        else:
            t = torch.randn(2, num_blocks, block_size, heads, head_dim, generator=gen).to(dtype)
        tensors.append(t)
    es = tensors[0].element_size()
    row = heads * head_dim * es
    streams = []
    for layer, t in enumerate(tensors):
        for kv, comp in enumerate(("k", "v")):
            streams.append(
                StreamDesc(
                    group=0,
                    layer=layer,
                    component=comp,
                    buffer=t,
                    offset=kv * num_blocks * block_size * row,
                    block_stride=block_size * row,
                    slot_stride=row,
                    row_stride=row,
                    rows_per_slot=1,
                    row_bytes=row,
                )
            )
    desc = CopyDescriptor(
        layout="test-nhd",
        groups=(GroupDesc(0, "full", block_size),),
        streams=tuple(streams),
        fingerprint=f"test-nhd:L{layers}:H{heads}:D{head_dim}:{dtype}",
    )
    return tensors, desc


def two_group_kv(num_blocks=32, seed=None):
    """Two groups of different block sizes: 'full' (16 tokens/block) and 'compressed' (64 tokens/block, one slot
    per 4 tokens), like DeepSeek-style hybrid caches."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def make(*shape):
        return (
            torch.zeros(*shape, dtype=torch.uint8)
            if gen is None
            else torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        )

    full = make(num_blocks, 16, 32)  # [blocks, slots, row bytes]
    comp = make(num_blocks, 16, 48)  # 64 tokens / 4 per slot = 16 slots of 48 bytes
    streams = (
        StreamDesc(0, 0, "kv", full, 0, 16 * 32, 32, 32, 1, 32),
        StreamDesc(1, 0, "latent", comp, 0, 16 * 48, 48, 48, 1, 48),
    )
    desc = CopyDescriptor(
        layout="test-two-group",
        groups=(GroupDesc(0, "full", 16), GroupDesc(1, "compressed", 64, tokens_per_slot=4)),
        streams=streams,
        fingerprint="test-two-group:v1",
    )
    return [full, comp], desc


def blocks_equal(a: list[torch.Tensor], b: list[torch.Tensor], block_ids_a, block_ids_b, block_dim: int = 1) -> bool:
    """Whether the listed blocks of tensors a equal the listed blocks of tensors b (block axis ``block_dim``)."""
    ia, ib = torch.as_tensor(block_ids_a), torch.as_tensor(block_ids_b)
    return all(torch.equal(x.index_select(block_dim, ia), y.index_select(block_dim, ib)) for x, y in zip(a, b))
