"""The round-trip harness must catch real faults: wrong gathered bytes, bytes written outside the addressed slots,
a dropped partial last block, writes past the chunk. Faulty backends here are real Backend subclasses."""

from __future__ import annotations

import pytest
import torch

from kvport.hal.backends.torch_ref import TorchBackend
from kvport.kernels.torch.views import storage_bytes
from kvport.layouts import catalog_names, load_layout
from kvport.layouts.roundtrip import cross, roundtrip


class FlipsAGatheredByte(TorchBackend):
    def gather(self, descriptor, block_ids, dst, num_tokens):
        done = super().gather(descriptor, block_ids, dst, num_tokens)
        dst[descriptor.canonical_bytes(num_tokens) // 2] ^= 0x5A
        return done


class WritesOutsideTheSlots(TorchBackend):
    def scatter(self, src, descriptor, block_ids, num_tokens):
        done = super().scatter(src, descriptor, block_ids, num_tokens)
        raw = storage_bytes(descriptor.streams[0].buffer)
        raw[-1] ^= 0xFF  # the last byte of the last block, which the plans never address in full
        return done


class DropsThePartialBlock(TorchBackend):
    def scatter(self, src, descriptor, block_ids, num_tokens):
        group = descriptor.groups[0]
        return super().scatter(src, descriptor, block_ids, num_tokens - num_tokens % group.tokens_per_block)


class WritesPastTheChunk(TorchBackend):
    def gather(self, descriptor, block_ids, dst, num_tokens):
        done = super().gather(descriptor, block_ids, dst, num_tokens)
        dst[descriptor.canonical_bytes(num_tokens)] ^= 1
        return done


def test_every_catalog_layout_round_trips_with_torch():
    for name in catalog_names():
        result = roundtrip(load_layout(name), TorchBackend(), seed=7)
        assert result.ok, f"{name}: {result.detail}"


def test_harness_catches_a_wrong_gathered_byte():
    result = roundtrip(load_layout("vllm-flash-hnd"), FlipsAGatheredByte(), seed=1)
    assert not result.ok
    assert "gather: 1 of" in result.detail


def test_harness_catches_bytes_outside_the_addressed_slots():
    result = roundtrip(load_layout("vllm-flash-nhd"), WritesOutsideTheSlots(), seed=1)
    assert not result.ok
    assert "scatter: 1 engine bytes differ from the expected state (1 of them outside the addressed slots)" in (
        result.detail
    )


def test_harness_catches_a_dropped_partial_block():
    result = roundtrip(load_layout("trtllm-pool"), DropsThePartialBlock(), seed=3)
    assert not result.ok
    assert "scatter:" in result.detail


def test_harness_catches_writes_past_the_chunk():
    result = roundtrip(load_layout("sglang-mha"), WritesPastTheChunk(), seed=3)
    assert not result.ok
    assert result.detail.endswith("gather: wrote past the end of the canonical chunk")


def test_cross_refuses_incompatible_layouts():
    result = cross(load_layout("vllm-flash-nhd"), load_layout("vllm-mla"), TorchBackend())
    assert not result.ok
    assert result.detail == "vllm-flash-nhd and vllm-mla have different canonical fingerprints"


def test_fingerprints_ignore_block_size_but_not_dims_dtype_or_opaque_layout():
    base = load_layout("vllm-flash-nhd").canonical_fingerprint()
    assert load_layout("vllm-flash-nhd", block_size=64).canonical_fingerprint() == base
    assert load_layout("trtllm-pool").canonical_fingerprint() == base
    assert load_layout("vllm-flash-nhd", dtype="float16").canonical_fingerprint() != base
    assert load_layout("vllm-flash-nhd", head_dim=32).canonical_fingerprint() != base
    cpu = load_layout("vllm-cpu-attn")
    assert cpu.canonical_fingerprint() != load_layout("vllm-cpu-attn", block_size=16).canonical_fingerprint()


def test_random_fill_is_random_bytes():
    from kvport.layouts import allocate

    kv = allocate(load_layout("vllm-flash-nhd"), 8, generator=torch.Generator().manual_seed(0))
    raw = kv.storages[0]
    assert int((raw == 0).sum()) < raw.numel() // 64
    assert torch.unique(raw).numel() == 256
    zeros = allocate(load_layout("vllm-flash-nhd"), 8, fill="zeros")
    assert int(zeros.storages[0].sum()) == 0


def test_an_unknown_staging_is_refused_not_run_as_host():
    with pytest.raises(ValueError, match="staging 'hots' is not one of device, host"):
        roundtrip(load_layout("vllm-flash-nhd"), TorchBackend(), staging="hots")
