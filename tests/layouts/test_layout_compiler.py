"""Compiler tests: real engine tensors bind per the declared structure; wrong dtype, shape, structure, block counts
or a memory order that disagrees with the spec are one-line LayoutErrors (never a guess from shapes)."""

from __future__ import annotations

import pytest
import torch

from kvport.layouts import LayoutError, allocate, compile_descriptor, load_layout


def _msg(spec, tensors):
    with pytest.raises(LayoutError) as err:
        compile_descriptor(spec, tensors)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_wrong_dtype():
    spec = load_layout("vllm-flash-nhd")
    tensors = [t.to(torch.float16) for t in allocate(spec, 4).tensors]
    assert _msg(spec, tensors) == "vllm-flash-nhd: groups[0] (attn) layer 0: dtype float16, the spec says bfloat16"


def test_wrong_shape_names_the_expected_shape():
    spec = load_layout("vllm-flash-nhd")
    tensors = [torch.zeros(2, 4, 16, 2, 8, dtype=torch.bfloat16)] * 2
    assert _msg(spec, tensors) == (
        "vllm-flash-nhd: groups[0] (attn) layer 0: shape (2, 4, 16, 2, 8) does not match KBNHC = (2, blocks, 16, 2, 16)"
    )


def test_merged_token_axis_must_divide_into_pages():
    spec = load_layout("sglang-mha")
    k = [torch.zeros(40, 2, 16, dtype=torch.bfloat16)] * 2
    assert _msg(spec, (k, k)) == (
        "sglang-mha: groups[0] (attn) k_list[0]: shape (40, 2, 16) does not match (BN)HC = (16*blocks, 2, 16)"
    )


def test_structure_is_taken_from_the_spec_not_guessed():
    spec = load_layout("vllm-flash-nhd")
    one = allocate(spec, 4).tensors[0]
    assert _msg(spec, one) == (
        "vllm-flash-nhd: groups[0] (attn): tensors: expected a list of 2 per-layer tensors, got a tensor of shape "
        "(2, 4, 16, 2, 16)"
    )
    assert _msg(load_layout("sglang-mha"), [one, one]) == (
        "sglang-mha: groups[0] (attn): expected (k_list, v_list), got a list of 2"
    )


def test_hnd_memory_handed_to_an_nhd_spec_is_refused():
    hnd = allocate(load_layout("vllm-flash-hnd"), 4).tensors  # NHD shape, HND strides
    msg = _msg(load_layout("vllm-flash-nhd"), hnd)
    assert msg.startswith("vllm-flash-nhd: groups[0] (attn) layer 0: byte strides (K=4096, B=1024, N=32, H=512, C=2)")
    assert msg.endswith("are not the spec's memory order KBNHC (or axes overlap)")


def test_layers_disagreeing_on_block_count():
    spec = load_layout("vllm-flash-nhd")
    a, b = allocate(spec, 4).tensors[0], allocate(spec, 5).tensors[0]
    assert _msg(spec, [a, b]) == "vllm-flash-nhd: groups[0] (attn): tensors disagree on the block count {4, 5}"


def test_multi_group_by_list_or_by_name():
    spec = load_layout("hybrid-swa")
    kv = allocate(spec, 3)
    full, sliding = kv.tensors
    by_name = compile_descriptor(spec, {"sliding": sliding, "full": full})
    assert [(s.group, s.layer) for s in by_name.streams] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert _msg(spec, {"full": full}) == "hybrid-swa: no tensors for group(s) sliding"
    assert _msg(spec, [full]) == "hybrid-swa: expected one entry per group (2) or a mapping by group name"


def test_shared_buffer_accepts_per_layer_views():
    spec = load_layout("vllm-cross-layer")
    kv = allocate(spec, 3)
    views = [kv.tensors.select(1, layer) for layer in range(2)]
    from_views = compile_descriptor(spec, views)
    for whole, view in zip(kv.descriptor.streams, from_views.streams):
        assert whole.base_ptr == view.base_ptr
        assert (whole.block_stride, whole.slot_stride, whole.row_stride) == (
            view.block_stride,
            view.slot_stride,
            view.row_stride,
        )


def test_padded_rows_and_explicit_block_stride(tmp_path):
    path = tmp_path / "padded.yaml"
    path.write_text(
        "name: padded\n"
        "groups:\n"
        "  - {kind: mla, layers: 1, tokens_per_block: 4, structure: per_layer, axes: BNC, dtype: bfloat16,\n"
        "     content: {elements: 6}, padded_content: {elements: 8}, strides: {B: {bytes: 96}}}\n"
    )
    spec = load_layout(str(path))
    kv = allocate(spec, 3)
    (stream,) = kv.descriptor.streams
    assert (stream.block_stride, stream.slot_stride, stream.row_bytes) == (96, 16, 12)
    assert kv.tensors[0].stride() == (48, 8, 1)
    dense = torch.zeros(3, 4, 8, dtype=torch.bfloat16)
    assert _msg(spec, [dense]) == "padded: groups[0] (g0) layer 0: B stride is 64 bytes, the spec says 96"


def test_opaque_blocks_must_be_contiguous():
    spec = load_layout("vllm-cpu-attn")
    kv = allocate(spec, 3)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in kv.tensors]  # H and N swapped in memory
    assert "not the spec's memory order LBHNC" in _msg(spec, strided)
