"""Golden tests: byte sizes and strides of named layouts, and canonical chunks checked against hand-written
indexing of the engine tensors (real torch indexing per engine shape, independent of the compiler)."""

from __future__ import annotations

import torch

from kvport.kernels.torch.gather import gather
from kvport.layouts import allocate, load_layout


def _streams(name, **dims):
    kv = allocate(load_layout(name, **dims), 5)
    return kv, [
        (s.component, s.offset, s.block_stride, s.slot_stride, s.row_stride, s.rows_per_slot, s.row_bytes)
        for s in kv.descriptor.streams
    ]


def test_vllm_flash_nhd_strides():
    kv, streams = _streams("vllm-flash-nhd")
    # per layer [2, 5 blocks, 16 slots, 2 heads, 16 x bf16]: block 1024 B, slot 64 B, head 32 B, V at 5 * 1024.
    assert streams == [
        ("k", 0, 1024, 64, 32, 2, 32),
        ("v", 5120, 1024, 64, 32, 2, 32),
        ("k", 0, 1024, 64, 32, 2, 32),
        ("v", 5120, 1024, 64, 32, 2, 32),
    ]
    assert [s.layer for s in kv.descriptor.streams] == [0, 0, 1, 1]
    assert kv.descriptor.canonical_bytes(100) == 100 * 2 * 2 * 2 * 32


def test_vllm_flash_hnd_is_an_nhd_shaped_view_with_hnd_strides():
    kv, streams = _streams("vllm-flash-hnd")
    assert tuple(kv.tensors[0].shape) == (2, 5, 16, 2, 16)
    assert streams[0] == ("k", 0, 1024, 32, 512, 2, 32)
    assert not kv.tensors[0].is_contiguous()


def test_trtllm_pool_strides():
    kv, streams = _streams("trtllm-pool")
    assert tuple(kv.tensors.shape) == (5, 2, 2, 2 * 32 * 16)
    # block = 2 layers * 2 (K,V) * 2 heads * 32 slots * 32 B = 8192; layer 4096; V +2048; head 1024; slot 32.
    assert streams == [
        ("k", 0, 8192, 32, 1024, 2, 32),
        ("v", 2048, 8192, 32, 1024, 2, 32),
        ("k", 4096, 8192, 32, 1024, 2, 32),
        ("v", 6144, 8192, 32, 1024, 2, 32),
    ]


def test_sglang_mha_lists_and_mla_width():
    kv, streams = _streams("sglang-mha")
    k_list, v_list = kv.tensors
    assert tuple(k_list[0].shape) == (5 * 16, 2, 16)
    assert streams[0] == ("k", 0, 1024, 64, 32, 2, 32)
    assert kv.descriptor.streams[1].buffer is v_list[0]
    spec = load_layout("vllm-mla")
    assert spec.groups[0].canonical_components()[0].row_bytes == 576 * 2
    assert spec.canonical_fingerprint() == load_layout("sglang-mla").canonical_fingerprint()


def test_cpu_attn_is_opaque_whole_blocks_of_views_into_one_buffer():
    kv, streams = _streams("vllm-cpu-attn")
    assert tuple(kv.tensors[0].shape) == (5, 2, 128, 32)
    assert kv.tensors[0].untyped_storage().data_ptr() == kv.tensors[1].untyped_storage().data_ptr()
    assert kv.tensors[1].data_ptr() - kv.tensors[0].data_ptr() == 5 * 16384
    assert streams == [("block", 0, 16384, 16384, 16384, 1, 16384)] * 2
    assert kv.descriptor.groups[0].opaque
    assert kv.descriptor.canonical_bytes(129) == 2 * 2 * 16384
    spec = load_layout("vllm-cpu-attn")
    assert "vllm-cpu-attn" in str(spec.canonical_description())


def test_deepseek_v4_groups_planes_and_padding():
    spec = load_layout("deepseek-v4")
    assert [(g.name, g.tokens_per_block, g.tokens_per_slot, g.slots_per_block) for g in spec.groups] == [
        ("swa", 64, 1, 64),
        ("compressed", 256, 4, 64),
        ("indexer", 64, 4, 16),
    ]
    kv = allocate(spec, 3)
    by_group = {}
    for s in kv.descriptor.streams:
        by_group.setdefault(s.group, []).append((s.component, s.offset, s.block_stride, s.slot_stride, s.row_bytes))
    assert by_group[0][0] == ("latent", 0, 64 * 640, 640, 584)
    assert by_group[1][0] == ("latent", 0, 64 * 640, 640, 584)
    # indexer block: 16 slots x 132 bytes; fp8 values of all slots first, then fp32 scales.
    assert by_group[2][:2] == [("value", 0, 2112, 128, 128), ("scale", 2048, 2112, 4, 4)]
    # 256 tokens: swa 256 slots * 584 * 2 layers, compressed 64 * 584 * 2, indexer 64 * 132 * 2.
    assert kv.descriptor.canonical_bytes(256) == 2 * (256 * 584 + 64 * 584 + 64 * 132)
    assert spec.bytes_per_token() == 2 * (584 + 584 / 4 + 132 / 4)


def test_bytes_per_token_for_a_real_model_size():
    # Llama-3-8B: 32 layers, 8 KV heads, head_dim 128, bf16 -> 128 KiB per token.
    assert load_layout("vllm-flash-nhd", layers=32, kv_heads=8, head_dim=128).bytes_per_token() == 131072


def test_spec_chunk_size_matches_the_compiled_descriptor():
    # `kvport layout show` sizes chunks from the spec alone; it must agree with what the copy ops move.
    from kvport.layouts import catalog_names

    for name in catalog_names():
        spec = load_layout(name)
        descriptor = allocate(spec, 1, fill="zeros").descriptor
        for tokens in (1, 7, 64, 256, 1000):
            assert sum(g.canonical_bytes(tokens) for g in spec.groups) == descriptor.canonical_bytes(tokens), name


def _by_hand(rows_of, layers, comps, slots):
    """Canonical bytes from a row accessor: stream (layer, comp) after stream, slot after slot."""
    parts = [
        rows_of(layer, comp, slot).contiguous().view(torch.uint8).reshape(-1)
        for layer in layers
        for comp in comps
        for slot in slots
    ]
    return torch.cat(parts)


def _gathered(kv, ids, n):
    dst = torch.empty(kv.descriptor.canonical_bytes(n), dtype=torch.uint8)
    gather(kv.descriptor, ids, dst, n)
    return dst


def test_canonical_chunk_matches_hand_indexing_of_each_engine_shape():
    n = 37
    ids = [3, 0, 5]
    slots = [(ids[s // 16], s % 16) for s in range(n)]

    kv = allocate(load_layout("vllm-flash-nhd"), 6)
    want = _by_hand(lambda layer, c, bs: kv.tensors[layer][c, bs[0], bs[1]], [0, 1], [0, 1], slots)
    assert torch.equal(_gathered(kv, ids, n), want)

    kv = allocate(load_layout("vllm-flashinfer-nhd"), 6)
    assert torch.equal(
        _gathered(kv, ids, n),
        _by_hand(lambda layer, c, bs: kv.tensors[layer][bs[0], c, :, :][bs[1]], [0, 1], [0, 1], slots),
    )

    kv = allocate(load_layout("vllm-packed-hnd"), 6)  # [B, H, N, 2*D], K then V in the content
    assert torch.equal(
        _gathered(kv, ids, n),
        _by_hand(lambda layer, c, bs: kv.tensors[layer][bs[0], :, bs[1], c * 16 : (c + 1) * 16], [0, 1], [0, 1], slots),
    )

    kv = allocate(load_layout("sglang-mha"), 6)  # token index = page * page_size + offset
    assert torch.equal(
        _gathered(kv, ids, n),
        _by_hand(lambda layer, c, bs: kv.tensors[c][layer][bs[0] * 16 + bs[1]], [0, 1], [0, 1], slots),
    )

    kv = allocate(load_layout("sglang-host-page-first"), 6)  # (2, size, L, H, D)
    assert torch.equal(
        _gathered(kv, ids, n),
        _by_hand(lambda layer, c, bs: kv.tensors[c, bs[0] * 16 + bs[1], layer], [0, 1], [0, 1], slots),
    )

    kv = allocate(load_layout("trtllm-pool", block_size=16), 6)  # [B, L, 2, H*N*D], HND inside
    assert torch.equal(
        _gathered(kv, ids, n),
        _by_hand(lambda layer, c, bs: kv.tensors[bs[0], layer, c].view(2, 16, 16)[:, bs[1]], [0, 1], [0, 1], slots),
    )


def test_opaque_chunk_is_whole_blocks_by_hand():
    kv = allocate(load_layout("vllm-cpu-attn"), 4)
    want = torch.cat(
        [kv.tensors[layer][b].contiguous().view(torch.uint8).reshape(-1) for layer in (0, 1) for b in (2, 0)]
    )
    assert torch.equal(_gathered(kv, [2, 0], 130), want)
