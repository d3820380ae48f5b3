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

# vLLM >= 0.32 (the `vllm.v1.kv_cache_layout.KVCacheLayout` enum exists) hands every attention layer a [B, H, N, C]
# view into one buffer per group (v1/worker/utils.py allocate_kv_cache) in the physical order the engine resolved;
# what H and C hold depends on how the backend packs a page, which its KV cache spec declares (customize_spec):
#   kv_packed: H = kv heads, C = K|V of one head (flash_attn.py etc. split it with .split(head_size, dim=-1));
#   kv_planes: H = 2 head slots (K, V), C = kv_heads*head_size; inside each slot the backend's own format;
#   mla:       H = 1, C = one latent row (kv_lora_rank + rope dims).
# Each entry was proven against vLLM's allocation and the backend's do_kv_cache_update (tests/engines/
# test_vllm_truth.py); a (backend, packing, layout) that is not listed is refused at start, never bound to a guess.
ORDERS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC", "BHLNC", "LHBNC")
_STD = {o: f"vllm-std-{o.lower()}" for o in ORDERS}
# Block-outer orders: the layers share one buffer (the same canonical chunks; whole blocks need the one buffer).
_MLA = {o: "vllm-std-mla-block-outer" if o.startswith("B") else "vllm-std-mla" for o in ORDERS}
# vLLM's CPU MLA writers address the cache as one dense [blocks * block_size, 576] array: CPU_MLA's .view raises and
# AMX_MLA's kernel writes other bytes than the view it hands connectors when blocks are not layer-compact (B before L).
_MLA_LAYER_COMPACT = {o: name for o, name in _MLA.items() if o.startswith("L")}
_KV_PLANES = {o: f"vllm-kvplanes-{o.lower()}" for o in ("LBHNC", "BLHNC", "LHBNC")}
_ROCM_SPLIT = {o: f"vllm-rocm-split-{o.lower()}" for o in ("LBHNC", "LHBNC")}
STANDARDIZED_FAMILIES: dict[str, dict[str, dict[str, str]]] = {
    **{
        b: {"kv_packed": _STD}
        for b in (
            "FLASH_ATTN",
            "TRITON_ATTN",
            "FLASHINFER",
            "FLEX_ATTENTION",
            "TRITON_FLASH_ATTN",
            "TRITON_FLASHINFER",
            "ROCM_AITER_UNIFIED_ATTN",
        )
    },
    # Registered as ROCM_AITER_FA but reports get_name() == "FLASH_ATTN": the adapter names backends by their class
    # (see AttentionInfo.backend). Its shuffle mode packs K/V as head slots the shuffle kernels re-tile in place, a
    # format not described here: refused.
    "ROCM_AITER_FA": {"kv_packed": _STD},
    "ROCM_ATTN": {"kv_planes": _ROCM_SPLIT},
    "ROCM_SEGMENTED_ATTN": {"kv_planes": _KV_PLANES},
    "B12X": {"kv_planes": _KV_PLANES},
    # In-block bytes are kernel-specific (K transposed); whole blocks are copied (cpu_attn.py).
    "CPU_ATTN": {"kv_packed": {"LBHNC": "vllm-cpu-attn"}},
    **{
        b: {"mla": _MLA}
        for b in ("FLASHMLA", "TRITON_MLA", "FLASHINFER_MLA", "ROCM_AITER_MLA", "CUTLASS_MLA", "FLASH_ATTN_MLA")
    },
    "CPU_MLA": {"mla": _MLA_LAYER_COMPACT},
    "AMX_MLA": {"mla": _MLA_LAYER_COMPACT},
}
# (backend, layout) -> catalog name, flattened for docs and tests.
STANDARDIZED_LAYOUTS: dict[tuple[str, str, str], str] = {
    (b, packing, o): name
    for b, fams in STANDARDIZED_FAMILIES.items()
    for packing, fam in fams.items()
    for o, name in fam.items()
}
# KV cache dtypes whose pages hold plain values (per-tensor scales live on the layer, not in the page).
PLAIN_QUANT = ("NONE", "FP8_PER_TENSOR")
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
    # How the page is packed, from the group's KV cache spec (vLLM >= 0.32), as the spec states it: head_slots and
    # content_bytes are vLLM's num_head_slots / state_content_bytes, None when the page is one slot per KV head with
    # K|V as content. Never derived from sizes: ROCm's two K/V head slots of 2 heads have the same sizes as that.
    kind: str = "attention"  # attention | mla | the spec class name of anything else
    head_slots: int | None = None
    content_bytes: int | None = None
    head_size_v: int | None = None
    quant: str = "NONE"  # vLLM KVQuantMode name
    tokens_per_state: int = 1
    padded_page: bool = False

    def packing(self) -> str:
        """kv_packed, kv_planes, mla or other: what the page's H and C hold (see STANDARDIZED_FAMILIES)."""
        from kvport.layouts.spec import DTYPE_SIZES

        item = DTYPE_SIZES.get(self.dtype, 0)
        if self.kind == "mla":
            return "mla" if self.head_slots in (None, 1) and self.content_bytes is None else "other"
        if self.kind != "attention" or self.head_size_v not in (None, self.head_size):
            return "other"
        if self.head_slots is None and self.content_bytes is None:
            return "kv_packed"
        if self.head_slots == 2 and self.content_bytes == self.num_kv_heads * self.head_size * item:
            return "kv_planes"
        return "other"


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
    if not info.standardized:
        name = LEGACY_LAYOUTS.get((info.backend, layout or "")) or LEGACY_LAYOUTS.get((info.backend, "*"))
        if name is None:
            known = ", ".join(sorted({b for b, _ in LEGACY_LAYOUTS}))
            raise UserError(
                f"vLLM attention backend {info.backend} with KV cache layout {layout} (legacy layouts) has no kvport "
                f"layout (backends known: {known}); set kv_connector_extra_config.layout to a catalog name or spec file"
            )
        return name
    packing = info.packing()
    why = None
    if info.quant not in PLAIN_QUANT:
        why = f"KV cache quantization {info.quant} keeps scales or packed codes in the page"
    elif info.tokens_per_state != 1:
        why = f"{info.tokens_per_state} tokens per stored state"
    elif info.padded_page:
        why = "padded pages"
    elif packing == "other":
        why = (
            f"{info.kind} pages with num_head_slots={info.head_slots}, state_content_bytes={info.content_bytes}, "
            f"head_size={info.head_size}, head_size_v={info.head_size_v}"
        )
    families = STANDARDIZED_FAMILIES.get(info.backend)
    name = None if why or families is None else families.get(packing, {}).get(layout or "")
    if name is None:
        what = why or (
            f"{packing} pages in layout {layout}"
            if families
            else "a backend kvport has not verified against vLLM's own code"
        )
        raise UserError(
            f"vLLM attention backend {info.backend} with KV cache layout {layout}: kvport has no verified layout for "
            f"{what} (see docs/vllm.md); set kv_connector_extra_config.layout only to a spec you have proven"
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


def info_from_spec(
    backend: str, spec: Any, layout: str | None, layer_names: Sequence[str], standardized: bool = True
) -> AttentionInfo:
    """An AttentionInfo from a vLLM KV cache spec object (read by attribute; vLLM is not imported here)."""
    kind = type(spec).__name__
    kind = "mla" if "MLA" in kind else "attention" if hasattr(spec, "num_kv_heads") else kind
    quant = getattr(getattr(spec, "kv_quant_mode", None), "name", "NONE")
    tokens = getattr(spec, "tokens_per_state", 1)
    return AttentionInfo(
        backend=backend,
        layout=str(layout).rsplit(".", 1)[-1] if layout is not None else None,
        standardized=standardized,
        block_size=spec.block_size,
        num_kv_heads=getattr(spec, "num_kv_heads", 1),
        head_size=getattr(spec, "head_size", 0),
        dtype=str(getattr(spec, "dtype", "")).removeprefix("torch."),
        layer_names=tuple(layer_names),
        kind=kind,
        head_slots=getattr(spec, "num_head_slots", None),
        content_bytes=getattr(spec, "state_content_bytes", None),
        head_size_v=getattr(spec, "head_size_v", None) if kind == "attention" else None,
        quant=quant,
        tokens_per_state=int(tokens) if tokens == int(tokens) else -1,
        padded_page=getattr(spec, "page_size_padded", None) is not None,
    )


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


def spec_for(infos: Sequence[AttentionInfo], override: str | None = None):
    """The layout spec for all of vLLM's KV cache groups: an explicit ``override`` as it is, else one catalog spec
    per group, combined in group order (group i is vLLM's kv_cache_groups[i]; its layers are the model's layer
    indices, so the chunk fingerprint says which layers sit in which group)."""
    import dataclasses as dc

    from kvport.layouts import LayoutSpec

    if override or len(infos) == 1:
        return load_for(infos[0], override)
    specs = [load_for(info) for info in infos]
    groups = []
    for i, (info, spec) in enumerate(zip(infos, specs)):
        indices = tuple(layer_index(n) for n in layer_order(info.layer_names))
        groups.extend(dc.replace(g, name=f"group{i}", layers=indices) for g in spec.groups)
    names = " + ".join(s.name for s in specs)
    return LayoutSpec(f"vllm-groups[{names}]", "vLLM KV cache groups: " + names, (), tuple(groups))


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    """The model layer index in a vLLM layer name: the first ``.<int>.`` (vLLM's extract_layer_index rule)."""
    match = _LAYER_INDEX.search(f".{name}.")
    if match is None:
        raise UserError(f"vLLM KV cache layer {name!r} has no layer index; cannot order layers")
    return int(match.group(1))


def layer_order(names: Sequence[str]) -> list[str]:
    """Layer names in model order (by layer_index)."""
    ordered = sorted(names, key=layer_index)
    seen = [layer_index(n) for n in ordered]
    if len(set(seen)) != len(seen):
        raise UserError(f"vLLM KV cache layers repeat a layer index: {ordered}")
    return ordered


def tensors_in_order(kv_caches: Mapping[str, Any], layer_names: Sequence[str]) -> list:
    """The per-layer tensors vLLM handed, in model layer order; a missing layer is an error."""
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise UserError(f"vLLM register_kv_caches: no tensor for layer(s) {', '.join(missing)}")
    return [kv_caches[n] for n in layer_order(layer_names)]


def descriptor_for(infos: Sequence[AttentionInfo], kv_caches: Mapping[str, Any], options: Mapping[str, Any]):
    """The compiled descriptor of vLLM's KV tensors (its ``layout`` names the catalog spec): one catalog spec per
    KV cache group (hybrid full + sliding window models have several), combined; the ``layout`` option replaces the
    whole mapping and must then describe every group. ``whole_blocks`` turns it into whole-block chunks
    (kvport.layouts.whole_blocks), refused in one line when vLLM's layout is layer-outer."""
    from kvport.layouts import compile_descriptor

    spec = spec_for(infos, options.get("layout"))
    per_group = [tensors_in_order(kv_caches, info.layer_names) for info in infos]
    descriptor = compile_descriptor(spec, per_group[0] if len(per_group) == 1 else per_group)
    if options.get("whole_blocks"):
        from kvport.layouts.whole_blocks import whole_blocks

        descriptor = whole_blocks(descriptor)
    return descriptor
