"""SGLang 0.5.23 on a CPU-only machine for the engine tests: importing its memory pools, building real device and host
pools, writing tokens with the pools' own code. Must not stand in for SGLang's classes; the only stand-ins are a
torchvision module (its pool modules import vision configs) and the device->host copy that needs sgl_kernel."""

from __future__ import annotations

import dataclasses
import enum
import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch


def import_sglang() -> None:
    """Skip unless SGLang is installed; make its memory-pool modules importable without torchvision.

    sglang/srt/configs/__init__.py imports vision-model configs that import torchvision.transforms at module level,
    and the PyPI torchvision wheel needs CUDA torch. transformers must see torchvision as absent (else it imports
    torchvision.io for its image processors), so its cached availability check runs first, then a module providing
    only the names those configs import at module level is registered. Calling any of them raises."""
    pytest.importorskip("sglang")
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached False before the module below exists
    root = _module("torchvision")
    transforms = _module("torchvision.transforms")
    functional = _module("torchvision.transforms.functional")
    mode = enum.Enum("InterpolationMode", {"NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic"})
    transforms.InterpolationMode = functional.InterpolationMode = mode
    transforms.__getattr__ = functional.__getattr__ = _absent
    root.transforms, transforms.functional = transforms, functional


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    sys.modules[name] = module
    return module


def _absent(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision stand-in: {name} is not available in kvport's SGLang tests")

    return fail


@dataclasses.dataclass
class Pools:
    """One SGLang device pool and its host pool (real classes), and where the test put its tokens."""

    device: Any
    host: Any
    mla: bool


def build_pools(
    mla: bool,
    layout: str,
    *,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    device_tokens: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
) -> Pools:
    """A device pool and a host pool of ``layout`` built the way SGLang's pool assembler does it (from the device
    pool's own buffer info), on the CPU, unpinned."""
    if mla:
        with one_rank():
            return _mla_pools(layout, layers, page_size, device_tokens, dtype, kv_lora_rank, rope_dim)
    return _mha_pools(layout, layers, heads, head_dim, page_size, device_tokens, dtype)


def one_rank():
    """What a one-rank server publishes: MLA pools read the decode-context-parallel settings."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().override(dcp_enabled=False, attn_dcp_size=1, attn_dcp_rank=0)


def device_pool(
    mla: bool,
    *,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 64,
    page_size: int = 16,
    device_tokens: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
) -> Any:
    """SGLang's device pool alone (MHATokenToKVPool or MLATokenToKVPool) on the CPU. The MHA pool's layout follows
    SGLang's own environment switch (SGLANG_USE_HND_KVCACHE), read when the pool is built."""
    if not mla:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

        return MHATokenToKVPool(
            size=device_tokens,
            page_size=page_size,
            dtype=dtype,
            head_num=heads,
            head_dim=head_dim,
            layer_num=layers,
            device="cpu",
            enable_memory_saver=False,
            enable_alt_stream=False,
        )
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    with one_rank():
        return MLATokenToKVPool(
            size=device_tokens,
            page_size=page_size,
            dtype=dtype,
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=rope_dim,
            layer_num=layers,
            device="cpu",
            enable_memory_saver=False,
        )


def _host_args(layout, layers, page_size, device_tokens) -> dict:
    """What both real host pools take beside the device pool's buffers: twice its size in host memory, unpinned."""
    return {
        "host_to_device_ratio": 2.0,
        "host_size": 0,
        "page_size": page_size,
        "layout": layout,
        "pin_memory": False,
        "device": "cpu",
        "device_capacity_tokens": device_tokens,
        "start_layer": 0,
        "end_layer": layers - 1,
    }


def _mla_pools(layout, layers, page_size, device_tokens, dtype, kv_lora_rank, rope_dim) -> Pools:
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    device = device_pool(
        True,
        layers=layers,
        page_size=page_size,
        device_tokens=device_tokens,
        dtype=dtype,
        kv_lora_rank=kv_lora_rank,
        rope_dim=rope_dim,
    )
    host = MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info,
        **_host_args(layout, layers, page_size, device_tokens),
        target_layer_num=layers,
    )
    return Pools(device, host, True)


def _mha_pools(layout, layers, heads, head_dim, page_size, device_tokens, dtype) -> Pools:
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    device = device_pool(
        False,
        layers=layers,
        heads=heads,
        head_dim=head_dim,
        page_size=page_size,
        device_tokens=device_tokens,
        dtype=dtype,
    )
    host = MHATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info, **_host_args(layout, layers, page_size, device_tokens)
    )
    return Pools(device, host, False)


def write_tokens(pools: Pools, locs: torch.Tensor, per_layer: list[tuple[torch.Tensor, ...]]) -> None:
    """Each layer's K/V (MHA) or latent parts (MLA: kv_c, k_pe) through the device pool's own set_kv_buffer, the
    call SGLang's attention backends make after computing a token's KV."""
    for layer_id, data in enumerate(per_layer):
        layer = types.SimpleNamespace(layer_id=layer_id)
        if pools.mla:
            with one_rank():
                pools.device.set_mla_kv_buffer(layer, locs, data[0], data[1])
        else:
            pools.device.set_kv_buffer(layer, locs, data[0], data[1])


def device_to_host(pools: Pools, device_locs: torch.Tensor, host_indices: torch.Tensor) -> None:
    """STAND-IN for sgl_kernel's backup_from_device_all_layer (CUDA/ROCm only): row host_indices[i] of every layer
    gets device row device_locs[i], through the per-layer host views SGLang hands its transfer kernels
    (k_data_refs / v_data_refs / data_refs, pool_host/mha.py and mla.py _initialize_transfer_views), or, for the two
    layouts whose views are not per layer (MHA page_head, MLA page_first_direct), init_kv_buffer's named dims."""
    for layer in range(pools.host.layer_num):
        for comp, rows in enumerate(device_rows(pools, layer, device_locs)):
            host_rows(pools.host, layer, comp, host_indices, rows)


def device_rows(pools: Pools, layer: int, locs: torch.Tensor) -> list[torch.Tensor]:
    if pools.mla:
        return [pools.device.kv_buffer[layer][locs]]
    return [pools.device.k_buffer[layer][locs], pools.device.v_buffer[layer][locs]]


def host_rows(host: Any, layer: int, comp: int, indices: torch.Tensor, value: torch.Tensor | None = None):
    """Read (or, with ``value``, write) rows ``indices`` of one layer and component (0 = K or latent, 1 = V) of a
    host pool, addressed the way SGLang's transfer kernels address them."""
    page = host.page_size
    p, o = indices // page, indices % page
    layout = host.layout
    if type(host).__name__ == "MLATokenToKVPoolHost":
        if layout in ("layer_first", "page_first"):
            ref = host.data_refs[layer]  # token-indexed [size, 1, dim] view (transposed for page_first)
            target = (indices,)
        elif layout == "page_first_direct":  # (page_num, layer_num, page_size, 1, dim)
            ref, target = host.kv_buffer, (p, layer, o)
        else:
            raise ValueError(layout)
    else:
        refs = host.k_data_refs if comp == 0 else host.v_data_refs
        if layout in ("layer_first", "page_first"):
            ref, target = refs[layer], (indices,)
        elif layout == "page_first_direct":  # per-layer view [page_num, page_size, heads, dim]
            ref, target = refs[layer], (p, o)
        elif layout == "page_head":  # (2, page_num, head_num, page_size, layer_num, head_dim)
            buf = host.kv_buffer[comp]
            if value is None:
                return buf[p, :, o, layer]
            buf[p, :, o, layer] = value
            return None
        else:
            raise ValueError(layout)
    if value is None:
        return ref[target]
    ref[target] = value
    return None


def random_tokens(pools: Pools, count: int, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Per layer, random K/V (MHA) or (kv_c, k_pe) (MLA) of ``count`` tokens in the pool's dtype."""
    out = []
    dev = pools.device
    for _ in range(dev.layer_num):
        if pools.mla:
            kv_c = torch.randn(count, 1, dev.kv_lora_rank, generator=gen).to(dev.dtype)
            k_pe = torch.randn(count, 1, dev.qk_rope_head_dim, generator=gen).to(dev.dtype)
            out.append((kv_c, k_pe))
        else:
            shape = (count, dev.head_num, dev.head_dim)
            out.append(
                (torch.randn(*shape, generator=gen).to(dev.dtype), torch.randn(*shape, generator=gen).to(dev.dtype))
            )
    return out


def expected_chunk(pools: Pools, per_layer: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """kvport's canonical chunk by definition (per layer, per component, per token, its rows), from the tokens."""
    parts = []
    for data in per_layer:
        rows = [torch.cat([data[0], data[1]], dim=-1)] if pools.mla else list(data)
        parts.extend(x.contiguous().view(torch.uint8).reshape(-1) for x in rows)
    return torch.cat(parts)


def storage_config(
    extra: dict[str, Any], *, mla: bool = False, tp_rank: int = 0, tp_size: int = 1, model="m", pp_rank=0, pp_size=1
):
    """SGLang's own HiCacheStorageConfig as its cache controller fills it for the dynamic backend."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    base = {
        "backend_name": "kvport",
        "module_path": "kvport.engines.sglang",
        "class_name": "KVPortHiCacheStorage",
        "interface_v1": 1,
    }
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=pp_rank,
        pp_size=pp_size,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=model,
        extra_config=base | extra,
    )


def create_backend(config):
    """The backend as SGLang creates it: StorageBackendFactory.create_backend("dynamic", ...)."""
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    return StorageBackendFactory.create_backend("dynamic", config, None)
