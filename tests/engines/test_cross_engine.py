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
from sglang_env import (  # noqa: E402
    build_pools,
    create_backend,
    device_to_host,
    host_rows,
    random_tokens,
    storage_config,
    write_tokens,
)
from vllm_truth import Case, Tokens, build, registered_name, write  # noqa: E402

from kvport.cache import CacheConfig, CacheEngine  # noqa: E402
from kvport.engines.vllm_layouts import info_from_spec, load_for, namespace_for, tensors_in_order  # noqa: E402
from kvport.layouts import compile_descriptor  # noqa: E402

PAGES = 3
SHARED = "shared-model"  # the `namespace` option, set the same on both engines
LAYERS = 3
PAIRS = [
    # (vLLM backend, vLLM layout, SGLang host layout)
    ("FLASH_ATTN", "LBNHC", "layer_first"),
    ("FLASH_ATTN", "BHLNC", "page_first"),
    ("TRITON_ATTN", "LHBNC", "page_head"),
    ("ROCM_ATTN", "LBHNC", "page_first_direct"),
    ("TRITON_MLA", "BLHNC", "page_first"),
    ("FLASHMLA", "LBNHC", "layer_first"),
]


def tier(tmp_path) -> list[dict]:
    return [{"type": "local_disk", "path": str(tmp_path / "shared-l2"), "bytes": "256MiB"}]


def vllm_side(case: Case, tmp_path):
    """A vLLM-allocated KV cache and a kvport engine bound to it the way kvport's vLLM connector binds it, with
    chunk_tokens = vLLM's block size (the smallest its kernels take: 16, or 64 for the MLA backends), which the
    SGLang side then uses as its page size."""
    engine = build(case)
    info = info_from_spec(registered_name(engine.backend_cls), engine.spec, case.layout, engine.names)
    config = CacheConfig(
        chunk_tokens=engine.block_size, key_scheme="sglang", l1_bytes=32 << 20, tiers=tier(tmp_path), async_store=False
    )
    cache = CacheEngine(config, namespace_for("m", None, "bfloat16", 0, 1, SHARED))
    cache.bind(compile_descriptor(load_for(info), tensors_in_order(engine.kv, engine.names)))
    return engine, cache


def sglang_side(mla: bool, layout: str, tmp_path, page: int):
    pools = build_pools(mla, layout, layers=LAYERS, page_size=page, device_tokens=4 * page)
    extra = {"namespace": SHARED, "l1_bytes": "32MiB", "tiers": tier(tmp_path), "async_store": False}
    backend = create_backend(storage_config(extra, mla=mla))
    backend.register_mem_pool_host(pools.host)
    backend.register_mem_host_pool_v2(pools.host, "kv")
    backend.on_host_pools_registered()
    return pools, backend


def sglang_hashes(tokens: list[int], page: int) -> list[str]:
    from sglang.srt.mem_cache.utils import get_hash_str

    return get_hash_str(tokens, None, page_size=page)


def as_vllm_tokens(mla: bool, data, block_ids: list[int]) -> Tokens:
    """SGLang's per-layer token data in vLLM's write format (MLA: kv_c [T, 512], k_pe [T, 1, 64])."""
    per_layer = [(d[0].squeeze(1), d[1]) if mla else d for d in data]
    return Tokens(per_layer[0][0].shape[0], block_ids, per_layer, 1.0)


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_vllm_to_sglang(tmp_path, backend: str, layout: str, host_layout: str) -> None:
    mla = "MLA" in backend
    engine, cache = vllm_side(Case(backend, layout, kv_heads=2, head_size=64, layers=LAYERS), tmp_path)
    page = engine.block_size
    pools, sglang = sglang_side(mla, host_layout, tmp_path, page)
    assert sglang.namespace == cache.namespace
    data = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(21))
    tokens = list(range(3000, 3000 + PAGES * page))
    blocks = [6, 1, 4]
    write(engine, as_vllm_tokens(mla, data, blocks))
    assert cache.store(tokens, blocks) == PAGES * page
    cache.close()

    hashes = sglang_hashes(tokens, page)
    assert sglang.batch_exists(hashes) == PAGES
    target = pools.host.alloc(PAGES * page)
    assert sglang.batch_get_v1(hashes, target) == [True] * PAGES
    for layer in range(LAYERS):
        parts = [torch.cat(data[layer], dim=-1)] if mla else list(data[layer])
        for comp, rows in enumerate(parts):
            got = host_rows(pools.host, layer, comp, target)
            assert torch.equal(got, rows.reshape(got.shape)), (layer, comp)
    sglang.close()


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_sglang_to_vllm(tmp_path, backend: str, layout: str, host_layout: str) -> None:
    mla = "MLA" in backend
    case = Case(backend, layout, kv_heads=2, head_size=64, layers=LAYERS)
    engine, cache = vllm_side(case, tmp_path)
    page = engine.block_size
    pools, sglang = sglang_side(mla, host_layout, tmp_path, page)
    data = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(22))
    locs = torch.arange(page, (PAGES + 1) * page)
    write_tokens(pools, locs, data)
    host_indices = pools.host.alloc(PAGES * page)
    device_to_host(pools, locs, host_indices)
    tokens = list(range(4000, 4000 + PAGES * page))
    assert sglang.batch_set_v1(sglang_hashes(tokens, page), host_indices) == [True] * PAGES
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
    """vLLM's CPU backend stores opaque blocks (K transposed inside): same keys, other fingerprint. SGLang may see
    the pages as present, but every load is refused and the host rows stay untouched (it recomputes)."""
    engine, cache = vllm_side(Case("CPU_ATTN", "LBHNC", kv_heads=2, head_size=64, layers=LAYERS), tmp_path)
    page = engine.block_size
    pools, sglang = sglang_side(False, "layer_first", tmp_path, page)
    data = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(23))
    tokens = list(range(5000, 5000 + PAGES * page))
    write(engine, as_vllm_tokens(False, data, [0, 1, 2]))
    assert cache.store(tokens, [0, 1, 2]) == PAGES * page
    cache.close()
    target = pools.host.alloc(PAGES * page)
    before = pools.host.kv_buffer.clone()
    assert sglang.batch_exists(sglang_hashes(tokens, page)) == PAGES  # same keys: only the fingerprint differs
    assert sglang.batch_get_v1(sglang_hashes(tokens, page), target) == [False] * PAGES
    assert torch.equal(pools.host.kv_buffer.view(torch.uint8), before.view(torch.uint8))
    sglang.close()
