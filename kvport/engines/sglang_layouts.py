"""Maps SGLang's HiCache host pool (the object handed to register_mem_pool_host) to a kvport catalog layout, its dims
and the cache namespace. Reads the pool by attribute; must not import SGLang or guess a layout from tensor shapes."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvport.errors import UserError

# (pool class, SGLang --hicache-mem-layout) -> catalog layout. Each pair's buffer is the one SGLang 0.5.23's
# init_kv_buffer allocates (pool_host/mha.py, pool_host/mla.py); tests/engines/test_sglang_pools.py binds the real
# pools and checks every token's rows. Pool classes are matched exactly: subclasses (MXFP8 scales, asymmetric K/V,
# HiSparse) store more or other bytes than these layouts describe and are refused.
LAYOUTS: dict[tuple[str, str], str] = {
    ("MHATokenToKVPoolHost", "layer_first"): "sglang-host-layer-first",
    ("MHATokenToKVPoolHost", "page_first"): "sglang-host-page-first",
    ("MHATokenToKVPoolHost", "page_first_direct"): "sglang-host-page-first-direct",
    ("MHATokenToKVPoolHost", "page_head"): "sglang-host-page-head",
    ("MLATokenToKVPoolHost", "layer_first"): "sglang-host-mla-layer-first",
    ("MLATokenToKVPoolHost", "page_first"): "sglang-host-mla-page-first",
    ("MLATokenToKVPoolHost", "page_first_direct"): "sglang-host-mla-page-first-direct",
}


@dataclasses.dataclass(frozen=True)
class HostPoolInfo:
    """What SGLang's host pool declares about itself."""

    pool: str  # class name
    layout: str
    layers: int
    page_size: int
    dtype: str
    kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    row_dim: int = 0  # MLA: the stored row (kv_lora_rank + rope unless packed)

    @property
    def mla(self) -> bool:
        return self.pool == "MLATokenToKVPoolHost"


def info_from_pool(pool: Any) -> HostPoolInfo:
    """A HostPoolInfo read from SGLang's host pool object (attributes of SGLang 0.5.23's pools)."""
    name = type(pool).__name__
    common = dict(
        pool=name,
        layout=str(getattr(pool, "layout", "")),
        layers=int(getattr(pool, "layer_num", 0)),
        page_size=int(getattr(pool, "page_size", 0)),
        dtype=str(getattr(pool, "dtype", "")).removeprefix("torch."),
    )
    if name == "MLATokenToKVPoolHost":
        return HostPoolInfo(
            **common,
            kv_lora_rank=int(pool.kv_lora_rank),
            rope_dim=int(pool.qk_rope_head_dim),
            row_dim=int(pool.kv_cache_dim),
        )
    if name == "MHATokenToKVPoolHost":
        return HostPoolInfo(
            **common, kv_heads=int(pool.head_num), head_dim=int(pool.head_dim), v_head_dim=int(pool.v_head_dim)
        )
    return HostPoolInfo(**common)


def catalog_layout(info: HostPoolInfo) -> str:
    """The kvport layout for this pool, or a one-line UserError saying why kvport cannot serve it."""
    name = LAYOUTS.get((info.pool, info.layout))
    why = None
    if name is None:
        known = ", ".join(sorted({f"{p} {lay}" for p, lay in LAYOUTS}))
        why = f"no verified layout for {info.pool} with --hicache-mem-layout {info.layout} (kvport serves: {known})"
    elif not info.mla and info.v_head_dim != info.head_dim:
        why = f"K and V head sizes differ ({info.head_dim} vs {info.v_head_dim})"
    elif info.mla and info.row_dim != info.kv_lora_rank + info.rope_dim:
        why = f"MLA rows of {info.row_dim} elements are not kv_lora_rank + rope ({info.kv_lora_rank}+{info.rope_dim})"
    if why:
        raise UserError(f"kvport SGLang storage backend: {why}")
    return name


def load_spec(info: HostPoolInfo):
    """The catalog spec for ``info`` with the pool's real dims."""
    from kvport.layouts import LayoutError, load_layout

    name = catalog_layout(info)
    if info.mla:
        dims = {"kv_lora_rank": info.kv_lora_rank, "rope_dim": info.rope_dim}
    else:
        dims = {"kv_heads": info.kv_heads, "head_dim": info.head_dim}
    try:
        return load_layout(name, layers=info.layers, page_size=info.page_size, dtype=info.dtype, **dims)
    except LayoutError as exc:
        raise UserError(f"kvport SGLang storage backend: {exc}") from None


def namespace(config: Any, info: HostPoolInfo, fingerprint: str, base: str | None = None) -> str:
    """Model identity + KV dtype + chunk format (the descriptor's ``fingerprint``) + shard, with the fields kvport's
    vLLM adapter keys by, so the same ``namespace`` option on both engines gives the same keys where the KV is the
    same: one pipeline stage holds layers 0..L-1 on both. MLA KV is the same on every tensor-parallel rank (SGLang
    writes it from rank 0 only), so it is keyed as one shard; pipeline stages hold different layers and are keyed
    apart (by stage: the host pool does not say which global layers a stage holds)."""
    from kvport.engines.key_namespace import layer_span, namespace_for

    ident = base or f"sglang:{config.model_name or ''}"
    rank, world = (0, 1) if info.mla else (config.tp_rank, config.tp_size)
    stage, stages = (config.pp_rank, config.pp_size) if config.pp_size > 1 else (0, 1)
    layers = layer_span(range(info.layers)) if stages == 1 else ""
    return namespace_for(
        "", None, info.dtype, rank, world, ident, layout=fingerprint, pp_rank=stage, pp_world=stages, layers=layers
    )


def check_parallelism(config: Any) -> None:
    """Refuse, at start, sharding kvport's keys do not describe (one line each)."""
    checks = [
        (getattr(config, "attn_cp_size", 1) > 1, f"attention context parallelism (attn_cp_size={config.attn_cp_size})"),
        (getattr(config, "dcp_size", 1) > 1, f"decode context parallelism (dcp_size={getattr(config, 'dcp_size', 1)})"),
        (getattr(config, "should_split_heads", False), "heads split across a tp_lcm_size group (tp_lcm_size)"),
    ]
    for bad, what in checks:
        if bad:
            raise UserError(f"kvport SGLang storage backend: {what} is not supported; run without it")
