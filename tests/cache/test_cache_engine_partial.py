"""Tests for loads that start past the engine's own prefix hit (kvport.cache.engine ``skip_tokens``), lookups that start
at a later chunk, and per-request key extras, with the torch backend."""

from __future__ import annotations

import pytest
import torch

from kvport.cache import CacheEngine, load_config
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.testing.kv import blocks_equal, nhd_kv, two_group_kv

C = 32  # chunk tokens: two 16-token blocks


def make_engine(tmp_path, desc=None, **overrides):
    cfg = {"chunk_tokens": C, "l1_bytes": "1MiB", "l2_path": str(tmp_path / "l2")} | overrides
    engine = CacheEngine(load_config(overrides=cfg, environ={}), "model-a|tp0/1")
    if desc is not None:
        engine.bind(desc, TorchBackend())
    return engine


def _sentinel(tensors, blocks):
    for t in tensors:
        t[:, blocks] = 7
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("where", ["l1", "l2", "scratch"])
def test_load_from_inside_a_chunk_writes_only_the_blocks_after_the_skip(tmp_path, where):
    """vLLM's own hit ends at token 48, inside chunk 1: only blocks 3.. of chunk 1 and later chunks are written."""
    tokens = list(range(C * 3 + 5))
    table = [10, 11, 12, 13, 14, 15, 16]
    if where == "l1":  # one engine, L1 only: it stores from blocks 0-6 of its memory, then loads into blocks 10-16
        kv, desc = nhd_kv(num_blocks=32, seed=21)
        with make_engine(tmp_path, desc=desc, l2_path=None) as engine:
            assert engine.store(tokens, list(range(7))) == 3 * C
            for t in kv:
                t[:, 10:17] = 0
            src, dst = [t.clone() for t in kv], kv
            before = _sentinel(dst, table[:3])
            assert engine.load(tokens, table, 3 * C, skip_tokens=48) == 48
    else:
        src, sdesc = nhd_kv(seed=21)
        with make_engine(tmp_path, desc=sdesc) as engine:
            assert engine.store(tokens, list(range(7))) == 3 * C
        dst, ddesc = nhd_kv()
        before = _sentinel(dst, table[:3])
        with make_engine(tmp_path, desc=ddesc, **({"l1_bytes": "8KiB"} if where == "scratch" else {})) as engine:
            if where == "scratch":  # every L1 slot pinned: the tail chunk is read through the scratch buffer
                pins = [engine.l1.reserve(f"{i:064x}") for i in range(engine.l1.num_slots)]
                assert all(pins)
            assert engine.load(tokens, table, 3 * C, skip_tokens=48) == 48
    assert blocks_equal(dst, before, table[:3], table[:3]), "blocks before the skip must not be written"
    assert blocks_equal(dst, src, table[3:6], [3, 4, 5])
    assert all(torch.count_nonzero(t[:, 16]) == 0 for t in dst)


def test_load_from_a_chunk_boundary_skips_whole_chunks(tmp_path):
    src, sdesc = nhd_kv(seed=22)
    tokens = list(range(C * 3))
    with make_engine(tmp_path, desc=sdesc) as engine:
        engine.store(tokens, list(range(6)))
    dst, ddesc = nhd_kv()
    before = _sentinel(dst, [20, 21])
    with make_engine(tmp_path, desc=ddesc) as engine:
        assert engine.load(tokens, [20, 21, 22, 23, 24, 25], 3 * C, skip_tokens=C) == 2 * C
        assert engine.stats()["hits_load_local_disk"] == 2  # chunk 0 was not even read
    assert blocks_equal(dst, before, [20, 21], [20, 21])
    assert blocks_equal(dst, src, [22, 23, 24, 25], [2, 3, 4, 5])


def test_two_groups_partial_load_and_unaligned_skip(tmp_path):
    src, sdesc = two_group_kv(seed=23)
    tokens = list(range(256))
    src_tables = [list(range(16)), [0, 1, 2, 3]]
    with make_engine(tmp_path, desc=sdesc, chunk_tokens=128) as engine:
        assert engine.store(tokens, src_tables) == 256
    dst, ddesc = two_group_kv()
    dst_tables = [list(range(16, 32)), [4, 5, 6, 7]]
    with make_engine(tmp_path, desc=ddesc, chunk_tokens=128) as engine:
        # 32 tokens is a whole 16-token block but half a 64-token block: nothing is loaded, nothing written
        assert engine.load(tokens, dst_tables, 256, skip_tokens=32) == 0
        assert all(torch.count_nonzero(t) == 0 for t in dst)
        # 192 = 1.5 chunks: aligned for both groups; the compressed group's slots are sliced by slot_count
        assert engine.load(tokens, dst_tables, 256, skip_tokens=192) == 64
    assert torch.equal(dst[0][dst_tables[0][12:]], src[0][src_tables[0][12:]])
    assert torch.count_nonzero(dst[0][dst_tables[0][:12]]) == 0
    assert torch.equal(dst[1][dst_tables[1][3:]], src[1][src_tables[1][3:]])
    assert torch.count_nonzero(dst[1][dst_tables[1][:3]]) == 0


def test_lookup_from_a_later_chunk(tmp_path):
    src, sdesc = nhd_kv(seed=24)
    tokens = list(range(C * 4))
    with make_engine(tmp_path, desc=sdesc) as engine:
        assert engine.store(tokens, list(range(8)), skip_tokens=C) == 3 * C  # chunk 0 never stored
        assert engine.lookup(tokens) == 0
        assert engine.lookup(tokens, start=C) == 4 * C
        assert engine.lookup(tokens, start=C + 16) == 4 * C
        assert engine.lookup(tokens, start=3 * C) == 4 * C
        engine.flush()
        engine.l1.discard(engine.chunk_keys(tokens)[2])
        engine.chunks.tiers[0].delete_one(engine.chunk_keys(tokens)[2])
        assert engine.lookup(tokens, start=C) == 2 * C
        assert engine.lookup(tokens, start=2 * C) == 2 * C  # chunk 2 missing: nothing from there


def test_request_extra_isolates_chunks(tmp_path):
    src, sdesc = nhd_kv(seed=25)
    tokens = list(range(C * 2))
    with make_engine(tmp_path, desc=sdesc) as engine:
        engine.store(tokens, list(range(4)), extra=b"lora:a")
        assert engine.lookup(tokens, extra=b"lora:a") == 2 * C
        assert engine.lookup(tokens) == 0
        assert engine.lookup(tokens, extra=b"lora:b") == 0
        dst, _ = nhd_kv()
        assert engine.load(tokens, list(range(4, 8)), 2 * C) == 0
        assert engine.load(tokens, list(range(4, 8)), 2 * C, extra=b"lora:a") == 2 * C
