"""kvport's SGLang storage backend against SGLang 0.5.23's real classes on the CPU: device pools written by their own
set_kv_buffer, host pools built from the device pool's buffer info in every layout kvport serves, the backend created
by SGLang's StorageBackendFactory from a HiCacheStorageConfig, keys from SGLang's own page hash. The device->host copy
is the one stand-in (sgl_kernel is CUDA/ROCm only): see sglang_env.device_to_host."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.sglang

from sglang_env import import_sglang  # noqa: E402

import_sglang()

import torch  # noqa: E402
from sglang_env import (  # noqa: E402
    build_pools,
    create_backend,
    device_to_host,
    expected_chunk,
    host_rows,
    random_tokens,
    storage_config,
    write_tokens,
)

from kvport.errors import UserError  # noqa: E402

PAGE = 16
PAGES = 3
CASES = [
    (False, "layer_first"),
    (False, "page_first"),
    (False, "page_first_direct"),
    (False, "page_head"),
    (True, "layer_first"),
    (True, "page_first"),
    (True, "page_first_direct"),
]


def page_hashes(tokens: list[int]) -> list[str]:
    from sglang.srt.mem_cache.utils import get_hash_str

    return get_hash_str(tokens, None, page_size=PAGE)


def extra(tmp_path, **more) -> dict:
    tiers = [{"type": "local_disk", "path": str(tmp_path / "l2"), "bytes": "256MiB"}]
    return {"l1_bytes": "32MiB", "tiers": tiers, "async_store": False} | more


def attach(pools, config):
    """What SGLang's cache controller does with a storage backend: create it, register the host pool(s)."""
    backend = create_backend(config)
    backend.register_mem_pool_host(pools.host)
    backend.register_mem_host_pool_v2(pools.host, "kv")
    backend.on_host_pools_registered()
    return backend


def filled(mla: bool, layout: str, seed: int):
    """Pools with PAGES pages of tokens written on the device and copied to the host; (pools, data, host indices)."""
    pools = build_pools(mla, layout, page_size=PAGE)
    gen = torch.Generator().manual_seed(seed)
    data = random_tokens(pools, PAGES * PAGE, gen)
    pages = torch.tensor([5, 2, 6])  # device page 0 is SGLang's padding page
    locs = (pages[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    write_tokens(pools, locs, data)
    host_indices = pools.host.alloc(PAGES * PAGE)  # SGLang's own host allocator
    device_to_host(pools, locs, host_indices)
    return pools, data, host_indices


@pytest.mark.parametrize("mla,layout", CASES)
def test_pages_round_trip_through_kvport_byte_exact(tmp_path, mla: bool, layout: str) -> None:
    pools, data, host_indices = filled(mla, layout, seed=len(layout) + mla)
    tokens = list(range(1000, 1000 + PAGES * PAGE))
    keys = page_hashes(tokens)
    backend = attach(pools, storage_config(extra(tmp_path), mla=mla))
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, host_indices) == [True] * PAGES
    assert backend.batch_exists(keys) == PAGES
    # What reached the disk tier is kvport's canonical chunk of each page, built from the tokens written.
    engine = backend._engine
    ours = backend._keys(keys)
    for page in range(PAGES):
        want = expected_chunk(pools, [tuple(x[page * PAGE : (page + 1) * PAGE] for x in layer) for layer in data])
        got = torch.empty(engine.chunk_bytes, dtype=torch.uint8)
        assert engine.chunks.read_into(ours[page], got)
        assert torch.equal(got, want), f"{layout}: page {page} stored bytes differ from the tokens written"
    backend.close()

    # A fresh engine (new host pool, new backend, same disk tier) loads the pages into other host rows.
    fresh = build_pools(mla, layout, page_size=PAGE)
    fresh.host.kv_buffer.view(torch.uint8).fill_(0x5A)
    before = fresh.host.kv_buffer.clone()
    other = fresh.host.alloc(PAGE)  # shift: the load lands on other pages than the store read from
    assert other is not None
    target = fresh.host.alloc(PAGES * PAGE)
    comps = 1 if mla else 2
    old_rows = {(la, c): host_rows(fresh.host, la, c, target).clone() for la in range(3) for c in range(comps)}
    backend = attach(fresh, storage_config(extra(tmp_path), mla=mla))
    assert backend.batch_exists(keys) == PAGES
    assert backend.batch_get_v1(keys, target) == [True] * PAGES
    for layer in range(fresh.host.layer_num):
        parts = [torch.cat(data[layer], dim=-1)] if mla else list(data[layer])
        for comp, rows in enumerate(parts):
            got = host_rows(fresh.host, layer, comp, target)
            assert torch.equal(got, rows.reshape(got.shape)), f"{layout}: layer {layer} component {comp} differs"
    # SGLang's own page serializer (what its file backend writes) sees the same pages as in the source pool.
    for page in range(PAGES):
        a = pools.host.get_data_page(int(host_indices[page * PAGE]), flat=True)
        b = fresh.host.get_data_page(int(target[page * PAGE]), flat=True)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # Nothing outside the loaded rows changed: put their old bytes back and the whole buffer is as before.
    for (layer, comp), rows in old_rows.items():
        host_rows(fresh.host, layer, comp, target, rows)
    assert torch.equal(fresh.host.kv_buffer.view(torch.uint8), before.view(torch.uint8)), (
        f"{layout}: other rows changed"
    )
    backend.close()


def test_keys_keep_models_ranks_and_dtypes_apart_and_mla_ranks_together(tmp_path) -> None:
    pools, _, host_indices = filled(False, "layer_first", seed=3)
    keys = page_hashes(list(range(PAGES * PAGE)))
    writer = attach(pools, storage_config(extra(tmp_path), model="model-a"))
    assert writer.batch_set_v1(keys, host_indices) == [True] * PAGES
    # Keys carry the chunk format (a different one never shares them) and the layers, in vLLM's fields.
    fields = json.loads(writer.namespace)
    assert fields["layout"] == writer._engine.descriptor.fingerprint and fields["layers"].startswith("0-")
    writer.close()
    for other in (
        storage_config(extra(tmp_path), model="model-b"),
        storage_config(extra(tmp_path), model="model-a", tp_rank=1, tp_size=2),
        storage_config(extra(tmp_path, salt="tenant-2"), model="model-a"),
    ):
        reader = attach(build_pools(False, "layer_first", page_size=PAGE), other)
        assert reader.batch_exists(keys) == 0, reader.namespace
        reader.close()
    half = attach(
        build_pools(False, "layer_first", page_size=PAGE, dtype=torch.float16),
        storage_config(extra(tmp_path), model="model-a"),
    )
    assert half.batch_exists(keys) == 0 and json.loads(half.namespace)["kv_dtype"] == "float16"
    half.close()
    # Same model and rank through another host layout: the same chunks (the canonical format is layout-free).
    other_layout = attach(
        build_pools(False, "page_head", page_size=PAGE), storage_config(extra(tmp_path), model="model-a")
    )
    assert other_layout.batch_exists(keys) == PAGES
    other_layout.close()
    # MLA KV is identical on every tensor-parallel rank: one namespace for all of them.
    mla = [
        attach(
            build_pools(True, "layer_first", page_size=PAGE),
            storage_config(extra(tmp_path), mla=True, tp_rank=r, tp_size=2),
        )
        for r in (0, 1)
    ]
    assert mla[0].namespace == mla[1].namespace and json.loads(mla[0].namespace)["tp"] == [0, 1]
    for backend in mla:
        backend.close()
    # Pipeline stages hold different layers: each keyed by its stage, none reading the single-stage pages above.
    stages = [
        attach(
            build_pools(False, "layer_first", page_size=PAGE),
            storage_config(extra(tmp_path), model="model-a", pp_rank=r, pp_size=2),
        )
        for r in (0, 1)
    ]
    assert [json.loads(b.namespace)["pp"] for b in stages] == [[0, 2], [1, 2]]
    assert all(json.loads(b.namespace)["layers"] == "" and b.batch_exists(keys) == 0 for b in stages)
    for backend in stages:
        backend.close()


def test_pages_not_whole_in_the_host_pool_are_not_moved(tmp_path) -> None:
    pools, _, host_indices = filled(False, "page_first", seed=4)
    keys = page_hashes(list(range(PAGES * PAGE)))
    backend = attach(pools, storage_config(extra(tmp_path)))
    shifted = host_indices.clone()
    shifted[PAGE : 2 * PAGE] = shifted[PAGE : 2 * PAGE].flip(0)  # page 1's rows out of order
    assert backend.batch_set_v1(keys, shifted) == [True, False, False]
    assert backend.batch_exists(keys) == 1
    assert backend.batch_set_v1(keys, host_indices[:-1]) == [False] * PAGES  # not a whole number of pages
    assert backend.batch_set_v1(keys[:1] + ["not-a-page-hash"] + keys[2:], host_indices) == [True, False, False]
    assert backend.batch_get_v1(keys, host_indices) == [True, False, False]
    backend.close()


def test_refusals_are_one_line(tmp_path) -> None:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    def refused(config, pools=None) -> str:
        with pytest.raises(UserError) as err:
            attach(pools or build_pools(False, "layer_first", page_size=PAGE), config)
        assert "\n" not in str(err.value)
        return str(err.value)

    no_v1 = storage_config(extra(tmp_path))
    no_v1.extra_config.pop("interface_v1")
    assert "interface_v1" in refused(no_v1)
    assert "chunk_tokens=64 but SGLang's page size is 16" in refused(storage_config(extra(tmp_path, chunk_tokens=64)))
    assert "key_scheme='kvport'" in refused(storage_config(extra(tmp_path, key_scheme="kvport")))
    assert "l1_bytes" in refused(storage_config(extra(tmp_path, l1_bytes="lots")))
    cp = storage_config(extra(tmp_path))
    cp.attn_cp_size = 2
    assert "context parallelism" in refused(cp)
    assert isinstance(cp, HiCacheStorageConfig)
    with pytest.raises(UserError, match="host pools mamba") as err:
        backend = create_backend(storage_config(extra(tmp_path)))
        pools = build_pools(False, "layer_first", page_size=PAGE)
        backend.register_mem_pool_host(pools.host)
        backend.register_mem_host_pool_v2(pools.host, "kv")
        backend.register_mem_host_pool_v2(pools.host, "mamba")
        backend.on_host_pools_registered()
    assert "\n" not in str(err.value)


def test_unserved_host_layouts_are_refused_by_name() -> None:
    from kvport.engines.sglang_layouts import HostPoolInfo, catalog_layout

    unified = HostPoolInfo("MHATokenToKVPoolHost", "page_unified", 2, 16, "bfloat16", 2, 64, 64)
    with pytest.raises(UserError, match="MHATokenToKVPoolHost with --hicache-mem-layout page_unified"):
        catalog_layout(unified)
    mxfp8 = HostPoolInfo("MHATokenToKVPoolMXFP8Host", "layer_first", 2, 16, "uint8", 2, 64, 64)
    with pytest.raises(UserError, match="no verified layout for MHATokenToKVPoolMXFP8Host"):
        catalog_layout(mxfp8)
    asym = HostPoolInfo("MHATokenToKVPoolHost", "layer_first", 2, 16, "bfloat16", 2, 64, 32)
    with pytest.raises(UserError, match="K and V head sizes differ"):
        catalog_layout(asym)
