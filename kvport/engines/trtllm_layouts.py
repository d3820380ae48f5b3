"""Maps TensorRT-LLM's KV cache pool (the one tensor handed to register_kv_caches) and its LLM arguments to a kvport
catalog layout, its dims and the cache namespace. Must not import TensorRT-LLM or guess NHD/HND from the shape."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvport.errors import UserError

# attn_backend (TorchLlmArgs) -> catalog layout. The default TRTLLM backend's C++ kernels address a block as
# [kv_heads, tokens_per_block, head_dim] (HND); VANILLA and FLASHINFER read the pool through get_buffers' default
# kv_layout="NHD" (tensorrt_llm/_torch/pyexecutor/resource_manager.py at commit 035ab91c). Unverified against a
# running TensorRT-LLM: none installs on the machines kvport is tested on.
LAYOUTS = {"TRTLLM": "trtllm-pool", "VANILLA": "trtllm-pool-nhd", "FLASHINFER": "trtllm-pool-nhd"}
DEFAULT_TOKENS_PER_BLOCK = 32  # KvCacheConfig.tokens_per_block's default


@dataclasses.dataclass(frozen=True)
class PoolInfo:
    """The pool tensor's facts plus what the LLM arguments say about the model shard it holds."""

    backend: str
    blocks: int
    layers: int
    kv_factor: int
    block_elements: int  # tokens_per_block * kv_heads * head_dim
    tokens_per_block: int
    kv_heads: int
    head_dim: int
    dtype: str


def model_dims(llm_args: Any) -> tuple[int, int]:
    """(kv heads per tensor-parallel rank, head_dim) from the model's config.json, as TensorRT-LLM derives them
    (num_key_value_heads split over tp ranks, at least one per rank)."""
    model = Path(str(getattr(llm_args, "model", "") or ""))
    config = model / "config.json"
    if not config.is_file():
        raise UserError(
            f"kvport TensorRT-LLM connector: cannot read the model's KV shape: no config.json in {str(model)!r}"
        )
    try:
        data = json.loads(config.read_text())
        heads = int(data.get("num_key_value_heads") or data["num_attention_heads"])
        head_dim = int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"kvport TensorRT-LLM connector: {config}: no KV head count or size ({exc})") from None
    tp = int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
    return max(1, heads // tp), head_dim


def pool_info(pool: Any, llm_args: Any) -> PoolInfo:
    """PoolInfo for the registered pool; a one-line UserError when it is not the single-pool shape kvport serves."""
    backend = str(getattr(llm_args, "attn_backend", "TRTLLM") or "TRTLLM").upper()
    cache = getattr(llm_args, "kv_cache_config", None)
    tokens = int(getattr(cache, "tokens_per_block", None) or DEFAULT_TOKENS_PER_BLOCK)
    if pool.dim() != 4:
        raise UserError(
            f"kvport TensorRT-LLM connector: the KV pool has shape {tuple(pool.shape)}, expected "
            "[num_blocks, num_layers, kv_factor, tokens_per_block*kv_heads*head_dim]"
        )
    blocks, layers, kv_factor, elements = (int(x) for x in pool.shape)
    if kv_factor != 2:
        raise UserError(
            f"kvport TensorRT-LLM connector: kv_factor {kv_factor} (K-only caches such as MLA) is not supported"
        )
    heads, head_dim = model_dims(llm_args)
    if elements != tokens * heads * head_dim:
        raise UserError(
            f"kvport TensorRT-LLM connector: a pool block holds {elements} elements per layer and K/V, not "
            f"tokens_per_block*kv_heads*head_dim = {tokens}*{heads}*{head_dim}"
        )
    dtype = str(pool.dtype).removeprefix("torch.")
    return PoolInfo(backend, blocks, layers, kv_factor, elements, tokens, heads, head_dim, dtype)


def load_spec(info: PoolInfo, override: str | None = None):
    """The catalog spec (or ``override``, a catalog name or file) for the pool, with its real dims."""
    from kvport.layouts import LayoutError, load_layout

    name = override or LAYOUTS.get(info.backend)
    if name is None:
        raise UserError(
            f"kvport TensorRT-LLM connector: attention backend {info.backend} has no kvport layout (known: "
            f"{', '.join(LAYOUTS)}); set KVPORT_TRTLLM_LAYOUT only to a spec you have proven"
        )
    dims = {
        "layers": info.layers,
        "kv_heads": info.kv_heads,
        "head_dim": info.head_dim,
        "block_size": info.tokens_per_block,
        "dtype": info.dtype,
    }
    try:
        declared = dict(load_layout(name).dims)
        return load_layout(name, **{k: v for k, v in dims.items() if k in declared})
    except LayoutError as exc:
        raise UserError(f"kvport TensorRT-LLM connector: {exc}") from None


def namespace(llm_args: Any, kv_dtype: str, rank: int, fingerprint: str, layers: int, base: str | None = None) -> str:
    """Model identity + KV dtype + chunk format (the descriptor's ``fingerprint``) + shard, with the fields of
    kvport's other adapters (the same ``base`` on every engine gives the same keys where the KV is the same)."""
    from kvport.engines.key_namespace import layer_span, namespace_for

    world = int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
    ident = base or f"trtllm:{getattr(llm_args, 'model', '')}:{getattr(llm_args, 'revision', None) or ''}"
    return namespace_for("", None, kv_dtype, rank, world, ident, layout=fingerprint, layers=layer_span(range(layers)))
