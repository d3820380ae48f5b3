"""Flat block-id tables on CPU: the Python-int fast path must give exactly the ids of the general (torch) path and
never accept what that path refuses."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer import segments  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402


def _descriptor(name: str, blocks):
    spec = load_layout(name)
    return spec, allocate(spec, blocks, generator=torch.Generator().manual_seed(3)).descriptor


def _general(d, ids, tokens):
    parts = d.block_tables(ids, tokens)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def test_multi_group_lists_take_the_fast_path_and_match_the_general_one():
    spec, d = _descriptor("deepseek-v4", [40, 40, 40][: len(load_layout("deepseek-v4").groups)])
    tokens = 300
    ids = [list(range(39, 39 - g.block_count(tokens) - 3, -1)) for g in d.groups]  # longer than needed: truncated
    assert segments._flat_int_list(d, ids, tokens) is not None
    got = segments.flat_block_ids(d, ids, tokens)
    assert got.dtype == torch.int64 and torch.equal(got, _general(d, ids, tokens))
    assert got.numel() == sum(g.block_count(tokens) for g in d.groups)


@pytest.mark.parametrize(
    "bad",
    [
        lambda ids: [[-1, *ids[0][1:]], *ids[1:]],  # negative
        lambda ids: [[10_000, *ids[0][1:]], *ids[1:]],  # past num_blocks
        lambda ids: [ids[0][:1], *ids[1:]],  # too few for the tokens
        lambda ids: [[5.5, *ids[0][1:]], *ids[1:]],  # a float is not a block id
    ],
)
def test_what_the_general_path_refuses_is_refused(bad):
    _, d = _descriptor("vllm-flash-nhd", 20)
    tokens = 3 * d.groups[0].tokens_per_block
    ids = bad([[5, 6, 7, 8]])
    assert segments._flat_int_list(d, ids, tokens) is None
    with pytest.raises(ValueError):
        segments.flat_block_ids(d, ids, tokens)


def test_tensors_and_nested_tables_keep_the_general_path():
    _, d = _descriptor("vllm-flash-nhd", 20)
    tokens = 2 * d.groups[0].tokens_per_block
    for ids in (torch.tensor([4, 9, 1]), [[4], [9]], (4.0, 9.0)):
        assert segments._flat_int_list(d, ids, tokens) is None
    assert torch.equal(segments.flat_block_ids(d, torch.tensor([4, 9, 1]), tokens), torch.tensor([4, 9]))
