"""Whole-block chunks (kvport.layouts.whole_blocks) proven on vLLM 0.32's own allocation and its backends' own
cache writes: a block-outer layout's block of every layer is one run, gathered byte for byte as vLLM allocated it and
scattered back so that the tokens read as vLLM wrote them; layer-outer layouts are refused in one line."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm_truth import Case, build, build_hybrid, expected_chunk, make_tokens, registered_name, write  # noqa: E402

from kvport.engines.vllm_layouts import info_from_spec, load_for, tensors_in_order  # noqa: E402
from kvport.hal.backends.torch_ref import TorchBackend  # noqa: E402
from kvport.layouts import LayoutError, compile_descriptor  # noqa: E402
from kvport.layouts.whole_blocks import whole_blocks  # noqa: E402

BLOCK_OUTER = [
    ("FLASH_ATTN", "BLNHC"),
    ("FLASH_ATTN", "BLHNC"),
    ("FLASH_ATTN", "BHLNC"),
    ("B12X", "BLHNC"),  # K/V head-slot pages
    ("TRITON_MLA", "BLHNC"),
    ("FLASHMLA", "BLNHC"),
]


def _plain(engine):
    """kvport's descriptor of vLLM's allocation, as the connector compiles it (canonical chunks)."""
    info = info_from_spec(registered_name(engine.backend_cls), engine.spec, engine.case.layout, engine.names)
    return compile_descriptor(load_for(info), tensors_in_order(engine.kv, engine.names))


def _descriptors(engine):
    plain = _plain(engine)
    return plain, whole_blocks(plain)


@pytest.mark.parametrize("backend,layout", BLOCK_OUTER)
def test_whole_blocks_are_vllms_blocks_and_carry_its_tokens(backend: str, layout: str) -> None:
    case = Case(backend, layout)
    engine = build(case)
    tokens = make_tokens(engine, torch.Generator().manual_seed(11))  # ends in a partial block
    write(engine, tokens)
    plain, blocks = _descriptors(engine)
    stride = blocks.streams[0].row_bytes
    assert stride == case.layers * engine.spec.page_size_bytes  # every layer of one block
    ops = TorchBackend()
    chunk = torch.empty(blocks.canonical_bytes(tokens.count), dtype=torch.uint8)
    ops.gather(blocks, tokens.block_ids, chunk, tokens.count)
    # The chunk is the allocation's runs at those block ids, whole (the partial last block too).
    raw = engine.raw()
    base = blocks.streams[0].base_ptr - raw.data_ptr()
    want = torch.cat([raw[base + b * stride : base + (b + 1) * stride] for b in tokens.block_ids])
    assert torch.equal(chunk, want)
    # Scattered into other blocks of a fresh cache, the tokens read back as vLLM's own write of them.
    mine = build(case)
    _, target = _descriptors(mine)
    new_ids = [(b + 3) % 8 for b in tokens.block_ids]
    ops.scatter(chunk, target, new_ids, tokens.count)
    plain_mine, _ = _descriptors(mine)
    canonical = torch.empty(plain_mine.canonical_bytes(tokens.count), dtype=torch.uint8)
    ops.gather(plain_mine, new_ids, canonical, tokens.count)
    assert torch.equal(canonical, expected_chunk(engine, tokens))
    # Only the same layout reads whole-block chunks: the fingerprint differs from the canonical format's.
    assert blocks.fingerprint != plain.fingerprint
    assert blocks.canonical_bytes(tokens.count) == len(tokens.block_ids) * stride


def test_in_block_orders_never_share_whole_block_chunks() -> None:
    """BLNHC and BLHNC hold the same tokens in a different byte order inside a block: different fingerprints, while
    their canonical (layer-major) chunks are the same format."""
    nhc, hnc = (_descriptors(build(Case("FLASH_ATTN", order))) for order in ("BLNHC", "BLHNC"))
    assert nhc[0].fingerprint == hnc[0].fingerprint
    assert nhc[1].fingerprint != hnc[1].fingerprint


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "LHBNC"])
def test_layer_outer_layouts_are_refused_in_one_line(layout: str) -> None:
    plain = _plain(build(Case("FLASH_ATTN", layout)))
    with pytest.raises(LayoutError, match="block-outer layout") as err:
        whole_blocks(plain)
    assert "\n" not in str(err.value)


def test_hybrid_groups_aliasing_one_allocation_move_their_own_blocks() -> None:
    """vLLM's hybrid groups (full attention, sliding window) alias one BLHNC allocation and the block pool hands each
    block to one group at a time: a group's whole block is exactly its own layers' rows there, so moving it leaves the
    other group's blocks alone."""
    from kvport.engines.vllm_layouts import spec_for

    h = build_hybrid("BLHNC", seed=3)
    cls = h.engine.backend_cls
    infos = [info_from_spec(registered_name(cls), g.kv_cache_spec, "BLHNC", g.layer_names) for g in h.groups]
    plain = compile_descriptor(spec_for(infos), [tensors_in_order(h.kv, n) for n in h.names])
    blocks = whole_blocks(plain)
    tables, count = h.tables, h.written[0].count
    ops = TorchBackend()
    chunk = torch.empty(blocks.canonical_bytes(count), dtype=torch.uint8)
    ops.gather(blocks, tables, chunk, count)
    moved = [[7, 2, 14], [4, 10, 6]]  # blocks no group used above
    before = torch.empty(plain.canonical_bytes(count), dtype=torch.uint8)
    ops.gather(plain, tables, before, count)
    ops.scatter(chunk, blocks, moved, count)
    after = torch.empty_like(before)
    ops.gather(plain, moved, after, count)
    assert torch.equal(after, before)
    again = torch.empty_like(before)
    ops.gather(plain, tables, again, count)  # the source blocks of both groups are untouched
    assert torch.equal(again, before)
    assert torch.equal(before, torch.cat([expected_chunk(h.engine, tokens) for tokens in h.written]))


@pytest.mark.parametrize(
    ("extra", "supported", "resolved"),
    [
        ({"whole_blocks": True}, ["LBNHC", "LBHNC", "BLNHC", "BLHNC", "BHLNC", "LHBNC"], "BLNHC"),
        ({"whole_blocks": True, "kv_cache_layout": "BHLNC"}, ["LBNHC", "BHLNC"], "BHLNC"),
        ({}, ["LBHNC", "BLNHC"], "LBHNC"),  # nothing asked: the backend's first choice
        ({"whole_blocks": True}, ["LBHNC"], "LBHNC"),  # CPU_ATTN's only layout: vLLM warns, the bind refuses
    ],
)
def test_vllm_resolves_the_layout_the_connector_asks_for(extra, supported, resolved) -> None:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout

    cfg = VllmConfig()
    cfg.kv_transfer_config = KVTransferConfig(
        kv_connector="KVPortConnector",
        kv_connector_module_path="kvport.engines.vllm",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
    )
    assert resolve_kv_cache_layout(cfg, [supported]).name == resolved


def test_the_worker_stores_and_loads_whole_blocks_through_the_cache(tmp_path) -> None:
    """The connector's worker on a real cache (disk tier) over vLLM's BLNHC allocation in whole blocks: a store, then
    a load into other blocks of a fresh allocation that starts inside a chunk (vLLM computed the first block): the
    loaded block holds vLLM's tokens, the skipped block is not written."""
    from kvport.cache import CacheEngine, load_config
    from kvport.engines.vllm_plan import TransferSpec
    from kvport.engines.vllm_worker import WorkerSide

    case = Case("FLASH_ATTN", "BLNHC")
    src, dst = build(case), build(case)
    tokens = make_tokens(src, torch.Generator().manual_seed(21))  # 2.5 blocks of 16 tokens
    write(src, tokens)
    prompt = list(range(100, 100 + tokens.count))
    config = load_config(None, {"l2_path": str(tmp_path / "l2"), "l1_bytes": "16MiB", "chunk_tokens": 32}, environ={})

    def worker(engine):
        cache = CacheEngine(config, "ns")
        cache.bind(whole_blocks(_plain(engine)))
        return cache, WorkerSide(cache, engine.block_size, async_stores=False)

    cache, side = worker(src)
    with cache:
        side.store([TransferSpec("a", prompt, [tokens.block_ids], 32)])
        assert side.counters["tokens_stored"] == 32
    target = [b for b in range(8) if b not in tokens.block_ids][:2]
    plain_dst = _plain(dst)
    ops = TorchBackend()
    before = torch.empty(plain_dst.canonical_bytes(16), dtype=torch.uint8)
    ops.gather(plain_dst, target[:1], before, 16)
    cache, side = worker(dst)
    with cache:
        side.load([TransferSpec("b", prompt, [target], 32, skip_tokens=16)])
        assert side.take_invalid_blocks() == set() and side.counters["tokens_loaded"] == 16
    plain_src = _plain(src)
    want, got, first = (torch.empty(plain_src.canonical_bytes(16), dtype=torch.uint8) for _ in range(3))
    ops.gather(plain_src, tokens.block_ids[1:2], want, 16)
    ops.gather(plain_dst, target[1:2], got, 16)
    ops.gather(plain_dst, target[:1], first, 16)
    assert torch.equal(got, want)
    assert torch.equal(first, before)
