"""Maps vLLM's declared attention backend and KV cache layout to a kvport catalog layout, and vLLM's per-layer
KV tensors to that layout's compiled descriptor. Must not import vLLM or guess NHD/HND from tensor shapes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kvport.errors import UserError

# vLLM's legacy layout names are aliases of its 5-letter layouts (vllm/config/cache.py in vLLM 0.32).
_LEGACY = {"NHD": "LBNHC", "HND": "LBHNC"}

# (vLLM attention backend name, resolved KV cache layout) -> kvport catalog layout. "*" = any layout.
#
# vLLM with standardized KV layouts (the `vllm.v1.kv_cache_layout.KVCacheLayout` enum exists, e.g. 0.32) hands
# every attention layer a [B, H, N, C] view into one buffer per group, C = K|V (flash_attn.py, triton_attn.py,
# flashinfer.py split it with `.split(head_size, dim=-1)`), in the physical order the engine resolved.
STANDARDIZED_LAYOUTS: dict[tuple[str, str], str] = {
    ("CPU_ATTN", "LBHNC"): "vllm-cpu-attn",  # opaque blocks: K transposed inside a block (cpu_attn.py)
    **{
        (backend, order): f"vllm-std-{order.lower()}"
        for backend in ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "ROCM_ATTN", "ROCM_AITER_FA")
        for order in ("LBNHC", "LBHNC", "BLHNC", "BLNHC")
    },
    ("FLASHMLA", "*"): "vllm-mla",
    ("FLASH_ATTN_MLA", "*"): "vllm-mla",
    ("TRITON_MLA", "*"): "vllm-mla",
    ("CUTLASS_MLA", "*"): "vllm-mla",
    ("FLASHINFER_MLA", "*"): "vllm-mla",
}
# Older vLLM (no KVCacheLayout enum): per-layer tensors from each backend's get_kv_cache_shape, NHD or HND.
LEGACY_LAYOUTS: dict[tuple[str, str], str] = {
    ("FLASH_ATTN", "LBNHC"): "vllm-flash-nhd",
    ("FLASH_ATTN", "LBHNC"): "vllm-flash-hnd",
    ("FLASHINFER", "LBNHC"): "vllm-flashinfer-nhd",
    ("FLASHINFER", "LBHNC"): "vllm-flashinfer-hnd",
    ("TRITON_ATTN", "LBNHC"): "vllm-triton-nhd",
    ("FLASHMLA", "*"): "vllm-mla",
    ("FLASH_ATTN_MLA", "*"): "vllm-mla",
    ("TRITON_MLA", "*"): "vllm-mla",
    ("CUTLASS_MLA", "*"): "vllm-mla",
}


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
    """What vLLM declares about one KV cache group (read from its config objects by the adapter)."""

    backend: str
    layout: str | None
    # True when vLLM declares standardized layouts (KVCacheLayout); selects the table above, never tensor shapes.
    standardized: bool
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str
    layer_names: tuple[str, ...]


def normalize_layout(layout: str | None) -> str | None:
    if layout is None:
        return None
    text = str(layout).rsplit(".", 1)[-1].upper()  # accepts "KVCacheLayout.LBHNC"
    return _LEGACY.get(text, text)


def catalog_layout(info: AttentionInfo, override: str | None = None) -> str:
    """The kvport layout for this backend/layout pair; ``override`` (a catalog name or YAML path) wins."""
    if override:
        return override
    layout = normalize_layout(info.layout)
    table = STANDARDIZED_LAYOUTS if info.standardized else LEGACY_LAYOUTS
    name = table.get((info.backend, layout or "")) or table.get((info.backend, "*"))
    if name is None:
        family = "standardized" if info.standardized else "legacy"
        known = ", ".join(sorted({b for b, _ in table}))
        raise UserError(
            f"vLLM attention backend {info.backend} with KV cache layout {layout} ({family} layouts) has no kvport "
            f"layout (backends known: {known}); set kv_connector_extra_config.layout to a catalog name or spec file"
        )
    return name


def layout_dims(info: AttentionInfo) -> dict[str, Any]:
    """Every dim kvport specs may declare, from vLLM's spec; the loader keeps the ones a spec uses."""
    return {
        "layers": len(info.layer_names),
        "kv_heads": info.num_kv_heads,
        "head_dim": info.head_size,
        "block_size": info.block_size,
        "dtype": info.dtype,
    }


def load_for(info: AttentionInfo, override: str | None = None):
    """Load the catalog spec for ``info`` with vLLM's real dims (only the dims that spec declares)."""
    from kvport.layouts import LayoutError, load_layout

    name = catalog_layout(info, override)
    try:
        declared = dict(load_layout(name).dims)
        dims = {k: v for k, v in layout_dims(info).items() if k in declared}
        return load_layout(name, **dims)
    except LayoutError as exc:
        raise UserError(f"kvport layout for vLLM backend {info.backend}: {exc}") from None


def namespace_for(
    model: str, revision: str | None, kv_dtype: str, rank: int, world: int, base: str | None = None
) -> str:
    """Model identity + KV dtype + shard, so chunks of different models or shards never share a key.
    ``base`` (kv_connector_extra_config.namespace) replaces the model identity, e.g. to share across paths."""
    ident = base or f"vllm:{model}:{revision or ''}"
    return f"{ident}|kv={kv_dtype}|tp{rank}/{world}"


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names in model order: by the first ``.<int>.`` in the name (vLLM's extract_layer_index rule)."""

    def index(name: str) -> int:
        match = _LAYER_INDEX.search(f".{name}.")
        if match is None:
            raise UserError(f"vLLM KV cache layer {name!r} has no layer index; cannot order layers")
        return int(match.group(1))

    ordered = sorted(names, key=index)
    seen = [index(n) for n in ordered]
    if len(set(seen)) != len(seen):
        raise UserError(f"vLLM KV cache layers repeat a layer index: {ordered}")
    return ordered


def tensors_in_order(kv_caches: Mapping[str, Any], layer_names: Sequence[str]) -> list:
    """The per-layer tensors vLLM handed, in model layer order; a missing layer is an error."""
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise UserError(f"vLLM register_kv_caches: no tensor for layer(s) {', '.join(missing)}")
    return [kv_caches[n] for n in layer_order(layer_names)]
