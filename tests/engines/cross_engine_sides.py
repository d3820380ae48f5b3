"""The two engines of the cross-engine tests, built from their own code: a vLLM-allocated KV cache with a kvport
cache bound to it the way kvport's vLLM connector binds it, and SGLang's real pools with kvport's HiCache backend
created by SGLang's factory. Needs vLLM and SGLang installed (the e2e session)."""

from __future__ import annotations

from pathlib import Path

import torch
from cross_engine_cases import LAYERS, SHARED, tier, vllm_cache
from sglang_env import build_pools, create_backend, device_to_host, random_tokens, storage_config, write_tokens
from vllm_truth import Case, Tokens, build, registered_name

from kvport.engines.vllm_layouts import info_from_spec, load_for, tensors_in_order
from kvport.layouts import compile_descriptor


def vllm_side(case: Case, tier_path: Path):
    """chunk_tokens = vLLM's block size (the smallest its kernels take: 16, or 64 for the MLA backends)."""
    engine = build(case)
    descriptor = compile_descriptor(load_for(vllm_info(engine)), tensors_in_order(engine.kv, engine.names))
    return engine, vllm_cache(engine.block_size, tier_path, descriptor)


def vllm_info(engine):
    return info_from_spec(registered_name(engine.backend_cls), engine.spec, engine.case.layout, engine.names)


def sglang_side(mla: bool, layout: str, tier_path: Path, page: int):
    pools = build_pools(mla, layout, layers=LAYERS, page_size=page, device_tokens=4 * page)
    extra = {"namespace": SHARED, "l1_bytes": "32MiB", "tiers": tier(tier_path), "async_store": False}
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


def sglang_stores(pools, sglang, tokens: list[int], page: int, seed: int) -> list:
    """SGLang storing the pages of ``tokens`` as it does: random KV written by its device pool's own setter, copied
    to host rows, ``batch_set_v1`` under its own page hashes (every page must be taken). Returns the KV written."""
    count = len(tokens) // page
    data = random_tokens(pools, count * page, torch.Generator().manual_seed(seed))
    locs = torch.arange(page, (count + 1) * page)  # device page 0 is SGLang's padding page
    write_tokens(pools, locs, data)
    host_indices = pools.host.alloc(count * page)
    device_to_host(pools, locs, host_indices)
    assert sglang.batch_set_v1(sglang_hashes(tokens, page), host_indices) == [True] * count
    return data


def sglang_loads(pools, sglang, tokens: list[int], page: int, data, mla: bool) -> None:
    """SGLang finding every page of ``tokens`` and loading them into host rows that then hold ``data``."""
    count = len(tokens) // page
    hashes = sglang_hashes(tokens, page)
    assert sglang.batch_exists(hashes) == count
    target = pools.host.alloc(count * page)
    assert sglang.batch_get_v1(hashes, target) == [True] * count
    host_matches(pools, data, target, mla)


def host_matches(pools, data, target: torch.Tensor, mla: bool) -> None:
    """SGLang's host rows at ``target`` hold ``data`` (per layer K and V, or the latent) byte for byte."""
    from sglang_env import host_rows

    for layer in range(LAYERS):
        parts = [torch.cat(data[layer], dim=-1)] if mla else list(data[layer])
        for comp, rows in enumerate(parts):
            got = host_rows(pools.host, layer, comp, target)
            assert torch.equal(got, rows.reshape(got.shape)), (layer, comp)
