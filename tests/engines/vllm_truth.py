"""Truth cases for vLLM 0.32 KV layouts: KV allocated by vLLM's own allocation path, written by each backend's own
do_kv_cache_update, expected bytes taken from the tokens written. Must not use kvport's specs to allocate or expect."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import torch
from standins import patch_vllm_gpu_writers, quantized

NUM_BLOCKS = 8
KV_LORA_RANK, ROPE_DIM = 512, 64  # DeepSeek V2/V3 latent: the only size vLLM's CPU MLA kernels compile for


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str  # AttentionBackendEnum name
    layout: str  # KVCacheLayout name
    cache_dtype: str = "auto"
    kv_heads: int = 2
    head_size: int = 64
    layers: int = 3


@dataclasses.dataclass
class Engine:
    """One vLLM-allocated KV cache with the backend's impl, ready to take tokens."""

    case: Case
    backend_cls: type
    spec: Any  # the (customized) KV cache spec of the group
    kv: dict[str, torch.Tensor]  # what register_kv_caches receives
    names: list[str]
    impl: Any
    constructed: bool  # False: the impl's __init__ needs a GPU; its update method ran on a bare instance
    bound: dict[str, torch.Tensor]  # what each layer's bind_kv_cache keeps

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    def raw(self) -> torch.Tensor:
        """The whole backing allocation as bytes."""
        raw = torch.empty(0, dtype=torch.uint8)
        return raw.set_(next(iter(self.kv.values())).untyped_storage())


def vllm_config(layout: str):
    from vllm.config import VllmConfig

    cfg = VllmConfig()
    cfg.cache_config.kv_cache_layout = layout
    # CPU_ATTN's impl reads the model dtype; no model is loaded here.
    object.__setattr__(cfg, "model_config", types.SimpleNamespace(dtype=torch.bfloat16))
    return cfg


def cache_torch_dtype(cache_dtype: str) -> torch.dtype:
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    return torch.bfloat16 if cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[cache_dtype]


def _block_size(cls, spec) -> int:
    from vllm.v1.worker.utils import select_common_block_size

    for size in (16, 32, 64, 128):
        try:
            if select_common_block_size(size, [cls], [spec]) == size:
                return size
        except (ValueError, TypeError):
            continue
    raise ValueError(f"{cls.get_name()}: no block size of 16..128 fits its kernels")


def build(case: Case) -> Engine:
    """vLLM's spec (customized by the backend), kv_cache_config, allocate_kv_cache and the layers' bound views."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheGroupSpec,
        KVCacheLayout,
        MLAAttentionSpec,
        get_kv_quant_mode,
    )
    from vllm.v1.worker.utils import allocate_kv_cache, customize_attention_spec

    patch_vllm_gpu_writers()
    cls = AttentionBackendEnum[case.backend].get_class()
    cfg = vllm_config(case.layout)
    dtype = cache_torch_dtype(case.cache_dtype)
    mla = cls.is_mla()
    if mla:
        base = MLAAttentionSpec(
            block_size=16,
            num_kv_heads=1,
            head_size=KV_LORA_RANK + ROPE_DIM,
            dtype=dtype,
            cache_dtype_str=case.cache_dtype,
        )
    else:
        quant = get_kv_quant_mode(case.cache_dtype)
        base = FullAttentionSpec(
            block_size=16, num_kv_heads=case.kv_heads, head_size=case.head_size, dtype=dtype, kv_quant_mode=quant
        )
    size = _block_size(cls, customize_attention_spec(cls, base))
    spec = customize_attention_spec(cls, base.copy_with_new_block_size(size))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(case.layers)]
    memory = NUM_BLOCKS * spec.page_size_bytes * case.layers
    with set_current_vllm_config(cfg):
        kcc = get_kv_cache_config_from_groups(cfg, [KVCacheGroupSpec(names, spec)], memory)
        kv = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[case.layout])
        impl, constructed = _impl(cls, case, mla)
    bound = {name: _bind(cfg, mla, view) for name, view in kv.items()}
    return Engine(case, cls, spec, kv, names, impl, constructed, bound)


def _bind(cfg, mla: bool, view: torch.Tensor) -> torch.Tensor:
    """The layer's own bind_kv_cache (MLA layers squeeze the head-slot dim), called on a stand-in layer object."""
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    layer = types.SimpleNamespace(_vllm_config=cfg, _uses_flat_kv_cache=lambda: False)
    (MLAAttention if mla else AttentionLayerBase).bind_kv_cache(layer, view)
    return layer.kv_cache


def _impl(cls, case: Case, mla: bool) -> tuple[Any, bool]:
    impl_cls = cls.get_impl_cls()
    common = dict(alibi_slopes=None, sliding_window=None, kv_cache_dtype=case.cache_dtype)
    try:
        if mla:
            impl = impl_cls(
                num_heads=4,
                head_size=KV_LORA_RANK + ROPE_DIM,
                scale=0.1,
                num_kv_heads=1,
                logits_soft_cap=None,
                attn_type="decoder",
                kv_sharing_target_layer_name=None,
                q_lora_rank=None,
                kv_lora_rank=KV_LORA_RANK,
                qk_nope_head_dim=128,
                qk_rope_head_dim=ROPE_DIM,
                qk_head_dim=128 + ROPE_DIM,
                v_head_dim=128,
                kv_b_proj=None,
                **common,
            )
        else:
            impl = impl_cls(
                num_heads=2 * case.kv_heads,
                head_size=case.head_size,
                scale=case.head_size**-0.5,
                num_kv_heads=case.kv_heads,
                **common,
            )
        return impl, True
    except (AssertionError, RuntimeError, ValueError, ImportError) as exc:
        # The constructor checks for a GPU, a GPU-only module or a GPU family; the update method reads only these.
        impl = object.__new__(impl_cls)
        impl.__dict__.update(
            attn_type="decoder",
            num_kv_heads=case.kv_heads,
            head_size=case.head_size,
            kv_cache_dtype=case.cache_dtype,
            kv_torch_dtype=cache_torch_dtype(case.cache_dtype),
            fp8_dtype=torch.float8_e4m3fn,
            init_error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
        return impl, False


@dataclasses.dataclass
class Tokens:
    """What was written: per layer, the K/V (or latent) of ``count`` tokens placed in ``block_ids``."""

    count: int
    block_ids: list[int]
    per_layer: list[tuple[torch.Tensor, ...]]
    scale: float


def make_tokens(engine: Engine, generator: torch.Generator, block_ids: list[int] | None = None) -> Tokens:
    bs = engine.block_size
    count = 2 * bs + bs // 2 + 1  # a partial last block
    need = -(-count // bs)
    if block_ids is None:
        block_ids = [int(b) for b in torch.randperm(NUM_BLOCKS, generator=generator)[:need]]
    scale = 1.0 if engine.case.cache_dtype == "auto" else 0.5
    per_layer = []
    for _ in engine.names:
        if engine.backend_cls.is_mla():
            kv_c = torch.randn(count, KV_LORA_RANK, generator=generator).to(torch.bfloat16)
            k_pe = torch.randn(count, 1, ROPE_DIM, generator=generator).to(torch.bfloat16)
            per_layer.append((kv_c, k_pe))
        else:
            shape = (count, engine.case.kv_heads, engine.case.head_size)
            key = torch.randn(*shape, generator=generator).to(torch.bfloat16)
            value = torch.randn(*shape, generator=generator).to(torch.bfloat16)
            per_layer.append((key, value))
    return Tokens(count, block_ids, per_layer, scale)


def write(engine: Engine, tokens: Tokens) -> None:
    """Each layer's tokens through the backend's own do_kv_cache_update into its bound view."""
    bs = engine.block_size
    t = torch.arange(tokens.count)
    slots = torch.tensor(tokens.block_ids)[t // bs] * bs + t % bs
    scale = torch.tensor(tokens.scale, dtype=torch.float32)
    for name, data in zip(engine.names, tokens.per_layer):
        view = engine.bound[name]
        if engine.backend_cls.is_mla():
            kv_c, k_pe = data
            engine.impl.do_kv_cache_update(kv_c, k_pe, view, slots, engine.case.cache_dtype, scale)
        else:
            layer = types.SimpleNamespace(_k_scale=scale, _v_scale=scale, _k_scale_float=tokens.scale)
            layer._v_scale_float = tokens.scale
            isa = getattr(inspect.getmodule(engine.backend_cls), "_get_attn_isa", None)
            if isa is not None:  # CPU_ATTN's metadata builder sets the kernel ISA on each layer (cpu_attn.py)
                layer.isa = isa(torch.bfloat16, bs, engine.case.head_size, engine.case.cache_dtype)
            engine.impl.do_kv_cache_update(layer, data[0], data[1], view, slots)


def expected_chunk(engine: Engine, tokens: Tokens) -> torch.Tensor:
    """The canonical chunk by definition: per layer, per component (K then V, or the latent), per token, its rows
    (one per head) as the cache kernels store them. Built from the tokens, never from engine memory."""
    like = torch.empty(0, dtype=cache_torch_dtype(engine.case.cache_dtype))
    parts = []
    for data in tokens.per_layer:
        if engine.backend_cls.is_mla():
            kv_c, k_pe = data
            rows = [torch.cat([kv_c, k_pe.squeeze(1)], dim=-1)]
        else:
            rows = list(data)
        for x in rows:
            parts.append(quantized(x, engine.case.cache_dtype, tokens.scale, like).contiguous().view(torch.uint8))
    return torch.cat([p.reshape(-1) for p in parts])


def registered_name(cls: type) -> str:
    from kvport.engines.vllm_setup import backend_name

    return backend_name(cls)


@dataclasses.dataclass
class Hybrid:
    """A hybrid model's KV in vLLM's two groups over one allocation, each group's tokens written at its own table."""

    kv: dict[str, torch.Tensor]
    names: list[list[str]]  # layer names per group
    groups: list[Any]  # vLLM's KVCacheGroupSpec per group
    engine: Engine  # FLASH_ATTN's impl, used to write (its own KV is not this allocation)
    tables: list[list[int]]
    written: list[Tokens]


def build_hybrid(layout: str, seed: int) -> Hybrid:
    """Full attention on layers 0 and 2, sliding window on 1 and 3: vLLM's get_kv_cache_config_from_groups and
    allocate_kv_cache make two groups over one allocation; FLASH_ATTN's own update writes each group's tokens at
    disjoint block tables (the block pool hands each block to one group at a time, as the groups alias memory)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, KVCacheLayout, SlidingWindowSpec
    from vllm.v1.worker.utils import allocate_kv_cache

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    swa = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, sliding_window=32)
    names = [[f"model.layers.{i}.self_attn.attn" for i in (0, 2)], [f"model.layers.{i}.self_attn.attn" for i in (1, 3)]]
    cfg = vllm_config(layout)
    with set_current_vllm_config(cfg):
        groups = [KVCacheGroupSpec(names[0], full), KVCacheGroupSpec(names[1], swa)]
        kcc = get_kv_cache_config_from_groups(cfg, groups, 16 * full.page_size_bytes * 2)
        kv = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[layout])
    engine = build(Case("FLASH_ATTN", layout, layers=2))
    gen = torch.Generator().manual_seed(seed)
    tables = [[3, 0, 9], [12, 5, 1]]
    written = []
    for group_names, table in zip(names, tables):
        engine.kv, engine.bound, engine.names = kv, dict(kv), group_names
        tokens = make_tokens(engine, gen, block_ids=table)
        write(engine, tokens)
        written.append(tokens)
    return Hybrid(kv, names, list(kcc.kv_cache_groups), engine, tables, written)
