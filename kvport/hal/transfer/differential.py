"""Differential checks of a backend against the torch reference: bytes equal, untouched memory untouched.
Owns only comparison helpers for tests and the GPU check run; must not choose which backends run."""

from __future__ import annotations

import random

import torch

from kvport.kernels.torch.gather import gather as ref_gather
from kvport.kernels.torch.scatter import scatter as ref_scatter
from kvport.kernels.torch.views import storage_bytes
from kvport.layouts.descriptor import CopyDescriptor


def random_block_ids(descriptor: CopyDescriptor, num_tokens: int, rng: random.Random, num_blocks: int):
    """One shuffled block table per group, distinct ids, as many as num_tokens needs."""
    tables = []
    for group in descriptor.groups:
        need = group.block_count(num_tokens)
        tables.append(rng.sample(range(num_blocks), need))
    return tables


def buffers(descriptor: CopyDescriptor) -> list[torch.Tensor]:
    seen, out = set(), []
    for stream in descriptor.streams:
        ptr = stream.buffer.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out.append(storage_bytes(stream.buffer))
    return out


def check_gather(backend, descriptor, block_ids, num_tokens, chunk_device, **kwargs) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    expect = torch.full((need + 64,), 0xA5, dtype=torch.uint8)
    ref_gather(descriptor, block_ids, expect, num_tokens)
    got = torch.full((need + 64,), 0xA5, dtype=torch.uint8, device=chunk_device)
    before = [b.clone() for b in buffers(descriptor)]
    backend.gather(descriptor, block_ids, got, num_tokens, **kwargs).wait()
    assert torch.equal(got.cpu(), expect), f"{descriptor.layout} gather mismatch at {num_tokens} tokens"
    for a, b in zip(before, buffers(descriptor)):
        assert torch.equal(a, b), "gather modified engine memory"


def check_scatter(backend, descriptor, block_ids, num_tokens, chunk_device, seed: int = 1, **kwargs) -> None:
    need = descriptor.canonical_bytes(num_tokens)
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (need,), dtype=torch.uint8, generator=gen)
    originals = [b.clone() for b in buffers(descriptor)]
    ref_scatter(src, descriptor, block_ids, num_tokens)
    expect = [b.clone() for b in buffers(descriptor)]
    for buf, orig in zip(buffers(descriptor), originals):
        buf.copy_(orig)
    assert any(not torch.equal(e, o) for e, o in zip(expect, originals)) or need == 0
    backend.scatter(src.to(chunk_device), descriptor, block_ids, num_tokens, **kwargs).wait()
    for buf, want in zip(buffers(descriptor), expect):
        # Equal to the reference everywhere: addressed slots written, every other byte untouched.
        assert torch.equal(buf.cpu(), want.cpu()), f"{descriptor.layout} scatter mismatch at {num_tokens} tokens"
