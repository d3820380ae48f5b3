"""Rows stored in pieces (D axis + vector, ROCm's x-packed K and transposed V), merged dims handed as several dense
tensor dims, and the loader refusing opaque groups whose block is not one contiguous run (before compile does)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvport.hal.backends.torch_ref import TorchBackend
from kvport.layouts import LayoutError, compile_descriptor, load_layout
from kvport.layouts.loader import parse_spec

GROUP = {
    "kind": "attention",
    "layers": 2,
    "tokens_per_block": 16,
    "structure": "per_layer",
    "axes": "BK(HDNC)",
    "heads": 2,
    "content": {"elements": 16},
    "vector": {"k": {"bytes": 16}, "v": {"elements": 1}},
    "dtype": "bfloat16",
}


def _spec(**changes):
    group = copy.deepcopy(GROUP)
    for key, value in changes.items():
        if value is None:
            group.pop(key, None)
        else:
            group[key] = value
    return parse_spec({"name": "t", "groups": [group]}, "t.yaml", {})


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"vector": None},
            "t.yaml: groups[0].axes: 'BK(HDNC)' has a D axis (row pieces) but the group gives no vector",
        ),
        ({"axes": "BK(HNC)", "shape_order": None}, "t.yaml: groups[0].vector: row pieces need a D axis in axes"),
        ({"vector": {"elements": 3}}, "t.yaml: groups[0].vector: 3 elements do not divide the row's 16 elements"),
        ({"vector": {"k": {"elements": 8}}}, "t.yaml: groups[0].vector: expected a width or one width per component"),
        (
            {"axes": "BKHDNC", "shape_order": None},
            "t.yaml: groups[0].vector: components differ in piece width, so D and C must share one dim",
        ),
        ({"padded_content": {"elements": 32}}, "t.yaml: groups[0].vector: a row stored in vector pieces cannot"),
        ({"axes": "DBK(HNC)", "shape_order": None}, "t.yaml: groups[0].axes: 'DBK(HNC)': D (row pieces) must lie"),
    ],
)
def test_vector_fields_are_checked_in_one_line(changes, message) -> None:
    with pytest.raises(LayoutError) as err:
        _spec(**changes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("axes", ["HBNC", "BHLNC", "NBHC"])
def test_opaque_blocks_must_be_one_run_inside_b(axes: str) -> None:
    """`layout check` used to accept these; only compile refused them (a block's bytes are not contiguous)."""
    group = {"kind": "opaque", "layers": 2, "tokens_per_block": 16, "axes": axes, "heads": 2, "dtype": "bfloat16"}
    group |= {"structure": "shared" if "L" in axes else "per_layer", "content": {"elements": 8}}
    with pytest.raises(LayoutError, match="an opaque block must be contiguous"):
        parse_spec({"name": "t", "groups": [group]}, "t.yaml", {})


def test_rocm_pieces_gather_the_tokens_written_by_the_paged_contract() -> None:
    """K as [heads, head/x, block, x] and V as [heads, head, block] inside each (block, K/V) region, handed as vLLM's
    [blocks, 2, block, heads*head] view: kvport's canonical chunk is the tokens' K and V rows (x = 16 bytes)."""
    heads, head, block, blocks, layers = 2, 16, 16, 5, 2
    spec = load_layout("vllm-rocm-split-lbhnc", layers=layers, kv_heads=heads, head_dim=head, block_size=block)
    buf = torch.zeros(blocks, layers, 2, block * heads * head, dtype=torch.bfloat16)  # L after B: any order binds
    views = [buf[:, li].view(blocks, 2, block, heads * head) for li in range(layers)]
    x = 8
    tokens = torch.randn(layers, 2, 20, heads, head).to(torch.bfloat16)
    ids = [3, 1]
    for li in range(layers):
        region = buf[:, li]
        k = region[:, 0].view(blocks, heads, head // x, block, x)
        v = region[:, 1].view(blocks, heads, head, block)
        for t in range(20):
            b, n = ids[t // block], t % block
            k[b, :, :, n, :] = tokens[li, 0, t].view(heads, head // x, x)
            v[b, :, :, n] = tokens[li, 1, t]
    desc = compile_descriptor(spec, views)
    chunk = torch.empty(desc.canonical_bytes(20), dtype=torch.uint8)
    TorchBackend().gather(desc, ids, chunk, 20)
    assert torch.equal(chunk, tokens.contiguous().view(torch.uint8).reshape(-1))
    back = torch.zeros_like(buf)
    TorchBackend().scatter(
        chunk, compile_descriptor(spec, [back[:, li].view(blocks, 2, -1) for li in range(layers)]), ids, 20
    )
    assert torch.equal(back, buf)
