"""DMA region lists and the path planner, on CPU: regions must reproduce the reference bytes; choices must follow
the cost model and never pick a path that cannot run."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer.planner import CostModel, estimate, plan  # noqa: E402
from kvport.hal.transfer.regions import region_count, regions  # noqa: E402
from kvport.hal.transfer.samples import Dims, sample  # noqa: E402
from kvport.hal.transfer.segments import check_buffer, compile_plan, flat_block_ids, merge_stream  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.kernels.torch.scatter import scatter as ref_scatter  # noqa: E402
from kvport.layouts import allocate, catalog_names, load_layout  # noqa: E402
from kvport.layouts.whole_blocks import whole_blocks  # noqa: E402

ALL_OK = {"dma": "", "staged": "", "zero-copy": ""}


def _copy_regions(dsts, srcs, sizes):
    """Apply a region list with ctypes memmove: the same addresses the copy engine would get."""
    import ctypes

    for d, s, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
        ctypes.memmove(d, s, n)


@pytest.mark.parametrize("name", catalog_names())
def test_regions_gather_and_scatter_match_reference(name):
    spec = load_layout(name)
    tokens = 2 * max(g.tokens_per_block for g in spec.groups) + 5
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    blocks = [n + 2 for n in need]
    kv = allocate(spec, blocks if len(blocks) > 1 else blocks[0], generator=torch.Generator().manual_seed(7))
    rng = random.Random(7)
    ids = [rng.sample(range(b), n) for b, n in zip(blocks, need)]
    d = kv.descriptor
    nbytes = d.canonical_bytes(tokens)
    expect = torch.zeros(nbytes, dtype=torch.uint8)
    ref_gather(d, ids, expect, tokens)
    got = torch.zeros(nbytes, dtype=torch.uint8)
    eng, can, size = regions(d, ids, tokens, got.data_ptr())
    assert int(size.sum()) == nbytes
    _copy_regions(can, eng, size)
    assert torch.equal(got, expect)
    # Scatter through the same regions equals the reference scatter, untouched bytes included.
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    before = [s.clone() for s in kv.storages]
    ref_scatter(src, d, ids, tokens)
    want = [s.clone() for s in kv.storages]
    for s, b in zip(kv.storages, before):
        s.copy_(b)
    eng, can, size = regions(d, ids, tokens, src.data_ptr())
    _copy_regions(eng, can, size)
    for s, w in zip(kv.storages, want):
        assert torch.equal(s, w)


def test_nhd_blocks_merge_into_one_region_each():
    d = sample("nhd", Dims(block=4, blocks=9))
    m = merge_stream(d.streams[0], d.groups[0])
    assert (m.rows, m.super_per_block, m.row_len) == (1, 1, 4 * d.streams[0].row_bytes)
    assert region_count(d, 16) == len(d.streams) * 4


def test_consecutive_blocks_merge_further():
    d = sample("nhd", Dims(block=4, blocks=9))
    host = torch.zeros(d.canonical_bytes(16), dtype=torch.uint8)
    _, _, size = regions(d, [[2, 3, 4, 5]], 16, host.data_ptr())
    assert size.numel() == len(d.streams)  # each stream's 4 blocks touch in memory and in the chunk


def test_hnd_widths_and_rows():
    d = sample("hnd", Dims())
    p = compile_plan(d, 10, chunk_ptr=1 << 20, anchor=0)
    assert [launch.width for launch in p.launches] == [16]
    assert p.launches[0].max_rows == Dims().heads


def test_planner_takes_the_copy_engines_for_large_regions_only():
    """32 KiB regions (NHD blocks) go to the copy engines, which kept full speed there on the H200; 4 KiB rows (HND)
    go through SM kernels; below the floor DMA is still taken when nothing else can run."""
    dims = Dims(layers=4, heads=8, head_dim=128, block=16, blocks=600)
    nhd, hnd = sample("nhd", dims), sample("hnd", dims)
    for direction in ("d2h", "h2d"):
        assert plan(nhd, 8192, direction, ALL_OK).path == "dma"
        assert plan(nhd, 256, direction, ALL_OK).path == "dma"
        assert plan(hnd, 8192, direction, ALL_OK).path == "staged"
    assert plan(nhd, 8192, "d2h", ALL_OK, model=CostModel(dma_min_region_bytes_d2h=1 << 20)).path == "staged"
    only_dma = dict(ALL_OK, staged="backend cannot", **{"zero-copy": "backend cannot"})
    assert plan(hnd, 8192, "d2h", only_dma).path == "dma"


def test_a_move_the_engine_waits_for_takes_the_path_that_releases_first():
    """``engine_waits`` (the engine orders its next work after the release; the staged path releases at its
    gathers/scatters): staged even where the copy engines would be taken; the copy engines where staged cannot run."""
    dims = Dims(layers=4, heads=8, head_dim=128, block=16, blocks=600)
    nhd = sample("nhd", dims)
    for direction in ("d2h", "h2d"):
        chosen = plan(nhd, 256, direction, ALL_OK, engine_waits=True)
        assert chosen.path == "staged" and "releases first" in chosen.reason
        assert plan(nhd, 256, direction, ALL_OK).path == "dma"
    no_staged = dict(ALL_OK, staged="backend cannot", **{"zero-copy": "backend cannot"})
    assert plan(nhd, 256, "d2h", no_staged, engine_waits=True).path == "dma"
    assert plan(nhd, 256, "d2h", ALL_OK, path="dma", engine_waits=True).path == "dma"  # a requested path stands


def test_without_batched_copies_small_regions_are_staged():
    """A build that issues one copy call per region (HIP, CUDA < 12.8) keeps 32 KiB NHD rows off the copy engines
    (2.5 us of host per call would hold them to a quarter of the link) and says why; regions large enough for one
    call each still take them, and a requested or only-possible DMA path still runs."""
    # A Llama-3-8B-shaped 256-token chunk (32 MiB): larger than zero-copy's limit, so the choice is DMA or staged.
    nhd = sample("nhd", Dims(layers=32, heads=8, head_dim=128, block=16, blocks=40))
    big = sample("nhd", Dims(layers=32, heads=8, head_dim=128, block=128, blocks=6))  # 256 KiB regions
    for direction in ("d2h", "h2d"):
        assert plan(nhd, 256, direction, ALL_OK).path == "dma"
        chosen = plan(nhd, 256, direction, ALL_OK, dma_batched=False)
        assert chosen.path == "staged" and "one copy call per region" in chosen.reason
        wide = plan(big, 256, direction, ALL_OK, dma_batched=False)
        assert wide.path == "dma" and "one copy call per region" in wide.reason
    assert plan(nhd, 256, "d2h", ALL_OK, path="dma", dma_batched=False).path == "dma"
    only_dma = dict(ALL_OK, staged="backend cannot", **{"zero-copy": "backend cannot"})
    assert plan(nhd, 256, "d2h", only_dma, dma_batched=False).path == "dma"
    m = CostModel()
    assert estimate(m, "dma", 32 << 20, 1024, "d2h", dma_batched=False) > estimate(m, "dma", 32 << 20, 1024, "d2h")


def test_planner_stages_moves_past_the_copy_engines_size_limit():
    """Moves of many regions go staged (describing 32768 regions held the host while the copy engines' speed varied
    0.56-0.99 between machines); a model without the limit, or no staged path, keeps them on the copy engines, and
    so does a move as large in few regions (whole blocks)."""
    nhd = sample("nhd", Dims(layers=4, heads=8, head_dim=128, block=16, blocks=600))
    per_chunk = region_count(nhd, 256)
    limit = CostModel().dma_max_move_regions
    below, above = (limit - 1) // per_chunk, -(-limit // per_chunk)
    for direction in ("d2h", "h2d"):
        assert plan(nhd, 256, direction, ALL_OK, chunks=below).path == "dma"
        assert plan(nhd, 256, direction, ALL_OK, chunks=above).path == "staged"
    assert plan(nhd, 256, "d2h", ALL_OK, model=CostModel(dma_max_move_regions=1 << 62), chunks=above).path == "dma"
    no_staged = dict(ALL_OK, staged="backend cannot")
    assert plan(nhd, 256, "d2h", no_staged, chunks=above).path == "dma"
    spec = load_layout("vllm-std-blnhc", layers=4, kv_heads=8, head_dim=128, block_size=16)
    blocks = whole_blocks(allocate(spec, 20).descriptor)  # 16 regions of 4 layers' blocks per chunk: 1/8 the regions
    assert blocks.canonical_bytes(256) == nhd.canonical_bytes(256) and region_count(blocks, 256) == 16
    assert plan(blocks, 256, "d2h", ALL_OK, chunks=above).path == "dma"


def test_planner_zero_copy_only_for_small_transfers():
    d = sample("hnd", Dims(layers=2, heads=2, head_dim=8, block=4, blocks=9))
    model = CostModel()
    small = plan(d, 4, "d2h", ALL_OK, model=model)
    assert d.canonical_bytes(4) <= model.zero_copy_max_bytes
    assert small.path == "zero-copy"
    tight = CostModel(zero_copy_max_bytes=1)
    assert plan(d, 4, "d2h", ALL_OK, model=tight).path != "zero-copy"


def test_planner_respects_refusals_and_requests():
    d = sample("nhd", Dims())
    no_dma = {"dma": "no native module", "staged": "", "zero-copy": ""}
    assert plan(d, 8, "d2h", no_dma).path != "dma"
    with pytest.raises(ValueError, match="no native module"):
        plan(d, 8, "d2h", no_dma, path="dma")
    assert plan(d, 8, "h2d", ALL_OK, path="staged").reason == "requested"
    with pytest.raises(ValueError, match="direction"):
        plan(d, 8, "sideways", ALL_OK)


def test_estimates_grow_with_regions():
    m = CostModel()
    assert estimate(m, "dma", 1 << 30, 32768, "d2h") > estimate(m, "dma", 1 << 30, 1, "d2h")


@pytest.mark.parametrize("bad", [-1, 4])
def test_out_of_range_block_ids_are_refused_like_the_reference(bad):
    """The DMA regions (and the Triton/native tables, which share flat_block_ids) must refuse what the torch
    reference refuses: an id outside the engine tensors would copy to or from memory that is not KV."""
    spec = load_layout("vllm-flash-nhd")
    kv = allocate(spec, 4, generator=torch.Generator().manual_seed(3))
    d = kv.descriptor
    tokens = 2 * spec.groups[0].tokens_per_block
    host = torch.zeros(d.canonical_bytes(tokens), dtype=torch.uint8)
    message = rf"block ids must be in 0\.\.3, got \[0, {bad}\]"
    with pytest.raises(ValueError, match=message):
        ref_gather(d, [0, bad], host, tokens)
    with pytest.raises(ValueError, match=message):
        regions(d, [0, bad], tokens, host.data_ptr())


def test_float_block_ids_are_refused_by_every_table_builder():
    spec = load_layout("vllm-flash-nhd")
    kv = allocate(spec, 4, generator=torch.Generator().manual_seed(3))
    tokens = 2 * spec.groups[0].tokens_per_block
    with pytest.raises(ValueError, match="block ids must be integers, got torch.float32"):
        flat_block_ids(kv.descriptor, [0.0, 2.5], tokens)
    assert flat_block_ids(kv.descriptor, [], 0).numel() == 0


def test_host_chunk_for_gpu_engine_must_be_pinned():
    """Both kernel backends reach a host chunk through its mapped address: pageable memory would fault the GPU."""
    chunk = torch.zeros(64, dtype=torch.uint8)
    check_buffer("gather dst", chunk, 64, engine_device=torch.device("cpu"))  # interpreter: CPU engine memory
    with pytest.raises(ValueError, match="gather dst: a host chunk must be pinned"):
        check_buffer("gather dst", chunk, 64, engine_device=torch.device("cuda", 0))


@pytest.mark.parametrize("name", ["nhd", "hnd", "mla_odd"])
@pytest.mark.parametrize("tokens", [1, 7, 23])
def test_region_template_fills_the_same_regions_as_a_direct_pass(name, tokens):
    import random

    from kvport.hal.transfer.regions import region_template
    from kvport.hal.transfer.segments import flat_block_ids

    d = sample(name, Dims())
    rng = random.Random(tokens)
    ids = [rng.sample(range(Dims().blocks), g.block_count(tokens)) for g in d.groups]
    template = region_template(d, tokens)
    got = template.fill(flat_block_ids(d, ids, tokens), 4096)
    want = _regions_direct(d, ids, tokens, 4096)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", ["nhd", "hnd", "mla_odd"])
def test_a_stacked_descriptor_gathers_k_chunks_back_to_back(name):
    """One gather over stack(d, k) with the k chunks' tables = the k chunks' canonical bytes, chunk after chunk."""
    import random

    from kvport.hal.transfer.stacking import stack, stacked_block_ids
    from kvport.kernels.torch.gather import gather
    from kvport.kernels.torch.scatter import scatter

    d = sample(name, Dims(blocks=40))
    tokens = max(g.tokens_per_block for g in d.groups) * 2
    rng = random.Random(7)
    per_group = [rng.sample(range(40), 3 * g.block_count(tokens)) for g in d.groups]  # disjoint across chunks
    tables = [
        [ids[j * g.block_count(tokens) : (j + 1) * g.block_count(tokens)] for g, ids in zip(d.groups, per_group)]
        for j in range(3)
    ]
    size = d.canonical_bytes(tokens)
    want = torch.cat([_gathered(gather, d, t, tokens, size) for t in tables])
    s = stack(d, 3)
    got = torch.empty(3 * size, dtype=torch.uint8)
    gather(s, stacked_block_ids(d, tables), got, tokens)
    assert s.canonical_bytes(tokens) == 3 * size and torch.equal(got, want)
    scatter(torch.flip(got, [0]).contiguous(), s, stacked_block_ids(d, tables), tokens)  # and back, other bytes
    back = torch.empty(3 * size, dtype=torch.uint8)
    gather(s, stacked_block_ids(d, tables), back, tokens)
    assert torch.equal(back, torch.flip(got, [0]))


def _gathered(gather, d, table, tokens, size):
    out = torch.empty(size, dtype=torch.uint8)
    gather(d, table, out, tokens)
    return out


def _regions_direct(descriptor, block_ids, num_tokens: int, chunk_ptr: int):
    """The regions computed in one pass from the descriptor (the template's oracle)."""
    from kvport.hal.transfer.regions import merge_touching
    from kvport.hal.transfer.segments import flat_block_ids, group_block_offsets, merge_stream

    ids = flat_block_ids(descriptor, block_ids, num_tokens)
    offsets = descriptor.stream_offsets(num_tokens)
    block_offsets = group_block_offsets(descriptor, num_tokens)
    eng_parts, can_parts, size_parts = [], [], []
    for stream, offset in zip(descriptor.streams, offsets):
        group = descriptor.groups[stream.group]
        m = merge_stream(stream, group)
        supers = m.super_count(group, num_tokens)
        length = descriptor.stream_bytes(stream, num_tokens)
        if supers == 0 or length == 0:
            continue
        s = torch.arange(supers, dtype=torch.int64)
        eng = (
            stream.base_ptr
            + ids[block_offsets[stream.group] + s // m.super_per_block] * stream.block_stride
            + (s % m.super_per_block) * m.slot_stride
        )
        r = torch.arange(m.rows, dtype=torch.int64)
        eng = (eng[:, None] + r[None, :] * m.row_stride).reshape(-1)
        start = (s[:, None] * m.rows + r[None, :]).reshape(-1) * m.row_len
        size = (length - start).clamp(0, m.row_len)
        keep = size > 0
        eng_parts.append(eng[keep])
        can_parts.append(chunk_ptr + offset + start[keep])
        size_parts.append(size[keep])
    if not size_parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone(), empty.clone()
    return merge_touching(torch.cat(eng_parts), torch.cat(can_parts), torch.cat(size_parts))
