"""What kvport's vLLM connector reads from vLLM when it starts: the attention backend and layout of each KV cache
group, the parallelism it refuses, where its log records go. Must not bind, store or move KV."""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from kvport.engines.vllm_layouts import AttentionInfo, info_from_spec
from kvport.errors import UserError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def route_logs_to_vllm() -> None:
    """vLLM configures handlers for its own ``vllm`` logger only (vllm/logger.py: ``propagate: False``), so kvport's
    INFO records never reached the server log (Python's last-resort handler prints WARNING and up, unformatted).
    Once per process, kvport's loggers write through vLLM's handlers, in vLLM's format and at its level. Nothing
    changes when vLLM's logging is off (VLLM_CONFIGURE_LOGGING=0: the application configures logging)."""
    ours, theirs = logging.getLogger("kvport"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def check_parallelism(vllm_config: VllmConfig) -> None:
    """Refuse what kvport's chunks cannot describe: with decode/prefill context parallelism the KV of one token
    sequence is spread over ranks by token, and no rank's blocks hold a whole chunk."""
    parallel = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            raise UserError(f"kvport does not support {name}={getattr(parallel, name)} (KV spread over ranks by token)")


def attention_infos(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[AttentionInfo]:
    """What vLLM declares for each KV cache group: backend name (from the layers), resolved layout, dims."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    standardized = importlib.util.find_spec("vllm.v1.kv_cache_layout") is not None
    layout = getattr(kv_cache_config, "kv_cache_layout", None)
    layout = layout or getattr(vllm_config.cache_config, "kv_cache_layout", None)
    if layout is None and not standardized:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout  # older vLLM: "NHD" / "HND"

        layout = get_kv_cache_layout()
    infos = []
    for group in kv_cache_config.kv_cache_groups:
        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, group.layer_names)
        backends = {backend_name(layer.get_attn_backend()) for layer in layers.values()}
        if len(backends) != 1:
            raise UserError(
                f"vLLM KV cache group {list(group.layer_names)[:2]}...: kvport needs one attention backend per group, "
                f"got {sorted(backends) or 'none'}"
            )
        spec = group.kv_cache_spec
        # vLLM's UniformTypeKVCacheSpecs: one block table over layers whose pages may differ (DeepSeek V4's caches,
        # packed into a few groups that alias one buffer); no catalog layout describes such a group.
        inner = getattr(spec, "kv_cache_specs", None)
        if inner:
            kinds = ", ".join(sorted({type(s).__name__ for s in inner.values()}))
            raise UserError(
                f"vLLM KV cache group {list(group.layer_names)[:2]}...: a packed group of per-layer specs ({kinds}), "
                "as DeepSeek V4's caches are; kvport has no verified layout for it"
            )
        if standardized:
            infos.append(info_from_spec(backends.pop(), spec, layout, group.layer_names))
            continue
        infos.append(
            AttentionInfo(
                backend=backends.pop(),
                layout=layout,
                standardized=standardized,
                block_size=spec.block_size,
                num_kv_heads=getattr(spec, "num_kv_heads", 1),
                head_size=getattr(spec, "head_size", 0),
                dtype=str(spec.dtype).removeprefix("torch."),
                layer_names=tuple(group.layer_names),
            )
        )
    return infos


def backend_name(cls: type) -> str:
    """The registry name of an attention backend class, found by class path along its MRO (vLLM's registry maps
    names to class paths). Not ``get_name()``: ROCM_AITER_FA's class reports "FLASH_ATTN" and packs pages its own way
    in shuffle mode, so the name it reports cannot tell the two apart."""
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError:  # older vLLM: only the reported name exists
        return cls.get_name()
    paths = {}
    for member in AttentionBackendEnum:
        try:
            path = member.get_path()
        except ValueError:  # CUSTOM before registration
            continue
        if path:
            paths.setdefault(path, member.name)
    for klass in cls.__mro__:
        name = paths.get(f"{klass.__module__}.{klass.__qualname__}")
        if name:
            return name
    return cls.get_name()
