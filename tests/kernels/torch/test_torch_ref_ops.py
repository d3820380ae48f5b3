"""Torch reference gather/scatter on hand-built descriptors: exact bytes, partial blocks, block-id validation,
and input errors. These do not go through the layout compiler, so they pin the ops to the descriptor contract."""

from __future__ import annotations

import pytest
import torch

from kvport.kernels.torch.gather import gather
from kvport.kernels.torch.scatter import scatter
from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc


def _descriptor(buffer, num_blocks=4, tokens_per_block=4, tokens_per_slot=1):
    # buffer [blocks, slots, 3 bytes] with one padding byte per slot: row 3 bytes at slot stride 4.
    group = GroupDesc(0, "g", tokens_per_block, tokens_per_slot, num_blocks=num_blocks)
    spb = tokens_per_block // tokens_per_slot
    stream = StreamDesc(0, 0, "x", buffer, 0, spb * 4, 4, 3, 1, 3)
    return CopyDescriptor("hand", (group,), (stream,), "fp")


def test_gather_reads_rows_in_slot_order_across_a_partial_block():
    buffer = torch.arange(4 * 4 * 4, dtype=torch.uint8)
    desc = _descriptor(buffer)
    dst = torch.full((100,), 0xEE, dtype=torch.uint8)
    gather(desc, [2, 0], dst, 6)  # 4 slots of block 2, then 2 slots of block 0
    rows = buffer.view(4, 4, 4)[:, :, :3]
    want = torch.cat([rows[2].reshape(-1), rows[0, :2].reshape(-1)])
    assert torch.equal(dst[:18], want)
    assert bool((dst[18:] == 0xEE).all()), "bytes past canonical_bytes stay untouched"


def test_scatter_writes_only_the_addressed_rows():
    buffer = torch.zeros(64, dtype=torch.uint8)
    desc = _descriptor(buffer)
    src = torch.arange(1, 19, dtype=torch.uint8)
    scatter(src, desc, torch.tensor([3, 1]), 6)
    view = buffer.view(4, 4, 4)
    assert torch.equal(view[3, :, :3].reshape(-1), src[:12])
    assert torch.equal(view[1, :2, :3].reshape(-1), src[12:18])
    assert int(view[:, :, 3].sum()) == 0, "padding bytes untouched"
    assert int(view[0].sum()) == 0 and int(view[2].sum()) == 0 and int(view[1, 2:].sum()) == 0


def test_compressed_slots_count_partial_slots():
    buffer = torch.arange(64, dtype=torch.uint8)
    desc = _descriptor(buffer, tokens_per_block=8, tokens_per_slot=2)  # 4 slots per block
    assert desc.canonical_bytes(5) == 3 * 3  # tokens 0-1, 2-3, 4 -> three slots
    dst = torch.empty(9, dtype=torch.uint8)
    gather(desc, [1], dst, 5)
    assert torch.equal(dst, buffer.view(4, 4, 4)[1, :3, :3].reshape(-1))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([0], "group 'g': 6 tokens need 2 blocks, got 1 block ids"),
        ([0, -1], r"group 'g': block ids must be in 0..3, got \[0, -1\]"),
        ([4, 0], r"group 'g': block ids must be in 0..3, got \[4, 0\]"),
        # 1.7 would otherwise be truncated to block 1: a silently wrong block.
        ([0.0, 1.7], r"group 'g': block ids must be integers, got torch.float32"),
        (torch.tensor([0.0, 1.0], dtype=torch.float64), r"group 'g': block ids must be integers, got torch.float64"),
    ],
)
def test_bad_block_ids_are_refused(ids, message):
    desc = _descriptor(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=message):
        gather(desc, ids, torch.empty(18, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match=message):
        scatter(torch.empty(18, dtype=torch.uint8), desc, ids, 6)


def test_staging_buffer_must_be_uint8_and_large_enough():
    desc = _descriptor(torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"gather: dst must be uint8 with >= 18 bytes, got torch.uint8 x 17"):
        gather(desc, [0, 1], torch.empty(17, dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match=r"scatter: src must be uint8 with >= 18 bytes, got torch.float32 x 18"):
        scatter(torch.empty(18, dtype=torch.float32), desc, [0, 1], 6)


def test_zero_tokens_moves_nothing():
    buffer = torch.zeros(64, dtype=torch.uint8)
    desc = _descriptor(buffer)
    scatter(torch.empty(0, dtype=torch.uint8), desc, [], 0)
    assert int(buffer.sum()) == 0


@pytest.mark.parametrize("kind", ["list", "torch", "numpy", "numpy rows"])
def test_one_group_table_nested_or_as_an_array(kind):
    np = pytest.importorskip("numpy")
    table = {
        "list": [[2, 0]],
        "torch": torch.tensor([[2, 0]]),
        "numpy": np.array([[2, 0]]),
        "numpy rows": [np.array([2, 0])],
    }[kind]
    buffer = torch.arange(4 * 4 * 4, dtype=torch.uint8)
    want, got = torch.empty(18, dtype=torch.uint8), torch.empty(18, dtype=torch.uint8)
    gather(_descriptor(buffer), [2, 0], want, 6)
    gather(_descriptor(buffer), table, got, 6)
    assert torch.equal(got, want)


def test_per_group_tables_for_two_groups():
    a, b = torch.arange(64, dtype=torch.uint8), torch.arange(64, 128, dtype=torch.uint8)
    groups = (GroupDesc(0, "a", 4, num_blocks=4), GroupDesc(1, "b", 2, num_blocks=8))
    streams = (StreamDesc(0, 0, "x", a, 0, 16, 4, 3, 1, 3), StreamDesc(1, 1, "x", b, 0, 8, 4, 3, 1, 3))
    desc = CopyDescriptor("two", groups, streams, "fp")
    dst = torch.empty(desc.canonical_bytes(3), dtype=torch.uint8)
    gather(desc, [[1], [5, 2]], dst, 3)
    want_a = a.view(4, 4, 4)[1, :3, :3].reshape(-1)
    want_b = torch.cat([b.view(8, 2, 4)[5, :, :3].reshape(-1), b.view(8, 2, 4)[2, :1, :3].reshape(-1)])
    assert torch.equal(dst, torch.cat([want_a, want_b]))
    with pytest.raises(ValueError, match=r"two: got 1 block-id lists, expected one per group \(2\)"):
        gather(desc, [[1]], dst, 3)
