"""Triton gather/scatter under TRITON_INTERPRET=1 on CPU against the torch reference (small shapes only)."""

from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton picks the interpreter at decoration time, so the variable must be set for the whole process
    # (the nox cpu-interpret session does); setting it here would leak into every other test of the run.
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 in the environment", allow_module_level=True)

from kvport.hal.backends.triton import TritonBackend  # noqa: E402
from kvport.hal.transfer.differential import check_gather, check_scatter, random_block_ids  # noqa: E402
from kvport.hal.transfer.samples import Dims, sample  # noqa: E402
from kvport.layouts import allocate, catalog_names, load_layout  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on CPU; GPU runs use -m gpu"),
]

TOKENS = [1, 7, 16, 23]


@pytest.mark.parametrize("name", ["nhd", "hnd", "packed", "mla_odd"])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_samples_match_reference(name, num_tokens):
    backend = TritonBackend()
    descriptor = sample(name, Dims(), seed=num_tokens)
    ids = random_block_ids(descriptor, num_tokens, random.Random(num_tokens), Dims().blocks)
    check_gather(backend, descriptor, ids, num_tokens, "cpu")
    check_scatter(backend, descriptor, ids, num_tokens, "cpu")


@pytest.mark.parametrize("name", catalog_names())
def test_catalog_layouts_match_reference(name):
    backend = TritonBackend()
    spec = load_layout(name)
    tokens = 2 * max(g.tokens_per_block for g in spec.groups) + 3
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    blocks = [n + 3 for n in need]
    kv = allocate(spec, blocks if len(blocks) > 1 else blocks[0], generator=torch.Generator().manual_seed(1))
    rng = random.Random(2)
    ids = [rng.sample(range(b), n) for b, n in zip(blocks, need)]
    check_gather(backend, kv.descriptor, ids, tokens, "cpu")
    check_scatter(backend, kv.descriptor, ids, tokens, "cpu")


def test_bounded_programs_cover_everything():
    """Zero-copy launches few programs; the persistent loop must still copy every tile."""
    backend = TritonBackend()
    descriptor = sample("hnd", Dims(blocks=12), seed=3)
    ids = random_block_ids(descriptor, 37, random.Random(3), 12)
    check_gather(backend, descriptor, ids, 37, "cpu", max_programs=2)
    check_scatter(backend, descriptor, ids, 37, "cpu", max_programs=3)


def test_unaligned_chunk_falls_to_narrow_elements():
    """A chunk at an odd address forces 1-byte elements; results must not change."""
    backend = TritonBackend()
    descriptor = sample("nhd", Dims(), seed=4)
    ids = random_block_ids(descriptor, 9, random.Random(4), Dims().blocks)
    need = descriptor.canonical_bytes(9)
    from kvport.kernels.torch.gather import gather as ref

    expect = torch.zeros(need, dtype=torch.uint8)
    ref(descriptor, ids, expect, 9)
    raw = torch.zeros(need + 1, dtype=torch.uint8)
    backend.gather(descriptor, ids, raw[1:], 9)
    assert torch.equal(raw[1:], expect)
    assert raw[0] == 0


@pytest.mark.parametrize("bad", [-1, 9])
def test_out_of_range_block_ids_are_refused(bad):
    """An id outside the engine tensors must be a ValueError before any launch, as in the torch reference."""
    backend = TritonBackend()
    spec = load_layout("vllm-flash-nhd")
    kv = allocate(spec, 9, generator=torch.Generator().manual_seed(5))
    tokens = 2 * spec.groups[0].tokens_per_block
    chunk = torch.zeros(kv.descriptor.canonical_bytes(tokens), dtype=torch.uint8)
    before = [s.clone() for s in kv.storages]
    with pytest.raises(ValueError, match=rf"block ids must be in 0\.\.8, got \[0, {bad}\]"):
        backend.gather(kv.descriptor, [0, bad], chunk, tokens)
    with pytest.raises(ValueError, match=rf"block ids must be in 0\.\.8, got \[0, {bad}\]"):
        backend.scatter(chunk, kv.descriptor, [0, bad], tokens)
    assert all(torch.equal(a, b) for a, b in zip(before, kv.storages))
