"""KV stored through one engine is a hit through another, byte-exact: vLLM 0.32 (KV allocated by its own
allocate_kv_cache, written by each backend's do_kv_cache_update, as in test_vllm_truth.py) and SGLang 0.5.23 (real
device and host pools, keys from its own page hash) share one disk tier. Both sides use key_scheme sglang with
chunk_tokens = SGLang's page size and the same ``namespace`` option. vLLM's CPU_ATTN blocks are opaque: refused."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.sglang]
pytest.importorskip("vllm")

from sglang_env import import_sglang  # noqa: E402

import_sglang()

import torch  # noqa: E402
from cross_engine_cases import LAYERS, PAGES, PAIRS  # noqa: E402
from cross_engine_sides import (  # noqa: E402
    as_vllm_tokens,
    sglang_hashes,
    sglang_loads,
    sglang_side,
    sglang_stores,
    vllm_side,
)
from sglang_env import random_tokens  # noqa: E402
from vllm_truth import Case, build, write  # noqa: E402


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_vllm_to_sglang(tmp_path, backend: str, layout: str, host_layout: str) -> None:
    mla = "MLA" in backend
    engine, cache = vllm_side(Case(backend, layout, kv_heads=2, head_size=64, layers=LAYERS), tmp_path / "l2")
    page = engine.block_size
    pools, sglang = sglang_side(mla, host_layout, tmp_path / "l2", page)
    assert sglang.namespace == cache.namespace
    data = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(21))
    tokens = list(range(3000, 3000 + PAGES * page))
    blocks = [6, 1, 4]
    write(engine, as_vllm_tokens(mla, data, blocks))
    assert cache.store(tokens, blocks) == PAGES * page
    cache.close()

    sglang_loads(pools, sglang, tokens, page, data, mla)
    sglang.close()


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_sglang_to_vllm(tmp_path, backend: str, layout: str, host_layout: str) -> None:
    mla = "MLA" in backend
    case = Case(backend, layout, kv_heads=2, head_size=64, layers=LAYERS)
    engine, cache = vllm_side(case, tmp_path / "l2")
    page = engine.block_size
    pools, sglang = sglang_side(mla, host_layout, tmp_path / "l2", page)
    tokens = list(range(4000, 4000 + PAGES * page))
    data = sglang_stores(pools, sglang, tokens, page, seed=22)
    sglang.close()

    blocks = [2, 7, 0]
    assert cache.lookup(tokens + [1, 2]) == PAGES * page
    assert cache.load(tokens, blocks, PAGES * page) == PAGES * page
    theirs = build(case)  # vLLM writing the same tokens into the same blocks itself
    write(theirs, as_vllm_tokens(mla, data, blocks))
    differ = int((engine.raw() != theirs.raw()).sum())
    assert differ == 0, f"{backend}/{layout} <- SGLang {host_layout}: {differ} bytes unlike vLLM's own write"
    cache.close()


def test_cpu_attn_blocks_are_never_loaded_into_sglang(tmp_path) -> None:
    """vLLM's CPU backend stores opaque blocks (K transposed inside): another fingerprint, so other keys (the
    namespace carries the fingerprint): SGLang sees no page, every load misses and the host rows stay untouched (it
    recomputes)."""
    engine, cache = vllm_side(Case("CPU_ATTN", "LBHNC", kv_heads=2, head_size=64, layers=LAYERS), tmp_path / "l2")
    page = engine.block_size
    pools, sglang = sglang_side(False, "layer_first", tmp_path / "l2", page)
    data = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(23))
    tokens = list(range(5000, 5000 + PAGES * page))
    write(engine, as_vllm_tokens(False, data, [0, 1, 2]))
    assert cache.store(tokens, [0, 1, 2]) == PAGES * page
    cache.close()
    target = pools.host.alloc(PAGES * page)
    before = pools.host.kv_buffer.clone()
    assert sglang.namespace != cache.namespace
    assert sglang.batch_exists(sglang_hashes(tokens, page)) == 0
    assert sglang.batch_get_v1(sglang_hashes(tokens, page), target) == [False] * PAGES
    assert torch.equal(pools.host.kv_buffer.view(torch.uint8), before.view(torch.uint8))
    sglang.close()
