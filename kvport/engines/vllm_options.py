"""The vLLM connector's ``kv_connector_extra_config``: adapter options plus cache settings, checked as a whole.
Owns the option names, their checks and the one-line errors; must not import vLLM, start anything or touch storage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvport.errors import UserError

# Keys the adapter itself reads (and their expected types); every other key must be a cache setting
# (kvport.cache.config.CacheConfig).
ADAPTER_KEYS: dict[str, type | tuple[type, ...]] = {
    "config": str,  # path of a cache config YAML; $KVPORT_CONFIG when absent
    "layout": str,  # a catalog layout name or a spec file, instead of the automatic choice
    "namespace": str,  # operator-set model identity: replaces model path, revision and weights digest in keys
    "stats_dir": str,  # the connector writes its counters there as JSON after each step with transfers
    "debug_random_load": bool,  # TEST ONLY: scatter random bytes instead of the loaded KV
    # Stores run beside the next forwards (vLLM keeps a finished request's blocks until they are done); false
    # orders every forward after the previous step's stores (kvport.engines.vllm_store_fences).
    "async_stores": bool,
    # The KV cache layout kvport asks vLLM for (a KVCacheLayout name: LBNHC, LBHNC, LHBNC, BLNHC, BLHNC, BHLNC; or
    # NHD / HND); vLLM uses it when every attention backend supports it and warns and picks its own otherwise.
    "kv_cache_layout": str,
    # Chunks hold whole engine blocks (every layer of a block, in the engine's byte order) so the copy engines move
    # a 256-token chunk in 16 regions (kvport.layouts.whole_blocks); needs a block-outer layout, BLNHC unless
    # kv_cache_layout says otherwise. Only the same layout reads such chunks.
    "whole_blocks": bool,
}
# vLLM 0.32's KVCacheLayout names (v1/kv_cache_layout.py) and its legacy aliases; the block-outer ones keep a block of
# every layer in one run of memory.
KV_CACHE_LAYOUTS = ("LBNHC", "LBHNC", "LHBNC", "BLNHC", "BLHNC", "BHLNC", "NHD", "HND")
BLOCK_OUTER = ("BLNHC", "BLHNC", "BHLNC")
WHERE = "kv_connector_extra_config"


def cache_keys() -> list[str]:
    from kvport.cache.config import CacheConfig

    return [f.name for f in dataclasses.fields(CacheConfig)]


def check_extra_config(extra: Mapping[str, Any] | None):
    """(adapter options, cache-config overrides, the loaded CacheConfig) for a connector's extra config, or a
    one-line UserError naming the first problem: an unknown key (listing the adapter keys and the cache keys), an
    option of the wrong type, a layout that does not load, or any cache setting the cache config refuses."""
    from kvport.cache.config import load_config

    if extra is not None and not isinstance(extra, Mapping):
        raise UserError(f"{WHERE}: expected a JSON object, got {type(extra).__name__}")
    extra = dict(extra or {})
    known = cache_keys()
    for key in extra:
        if key not in ADAPTER_KEYS and key not in known:
            adapter = ", ".join(ADAPTER_KEYS)
            raise UserError(f"{WHERE}: unknown key {key!r} (adapter keys: {adapter}; cache keys: {', '.join(known)})")
    options = {k: extra.pop(k) for k in ADAPTER_KEYS if k in extra}
    for key, value in options.items():
        expected = ADAPTER_KEYS[key]
        if not isinstance(value, expected) or (expected is str and not value.strip()):
            kind = "true or false" if expected is bool else "a non-empty string"
            raise UserError(f"{WHERE}: {key}={value!r}, expected {kind}")
    if "layout" in options:
        from kvport.layouts import LayoutError, load_layout

        try:
            load_layout(options["layout"])
        except LayoutError as exc:
            raise UserError(f"{WHERE}: layout={options['layout']!r}: {exc}") from None
    layout = options.get("kv_cache_layout")
    if layout is not None and layout not in KV_CACHE_LAYOUTS:
        raise UserError(f"{WHERE}: kv_cache_layout={layout!r}, expected one of {', '.join(KV_CACHE_LAYOUTS)}")
    if options.get("whole_blocks") and layout is not None and layout not in BLOCK_OUTER:
        raise UserError(
            f"{WHERE}: whole_blocks needs a block-outer kv_cache_layout ({', '.join(BLOCK_OUTER)}), got {layout!r}"
        )
    config = load_config(options.get("config"), extra)
    return options, extra, config


def required_layout(options: Mapping[str, Any]) -> str | None:
    """The KV cache layout to ask vLLM for: the ``kv_cache_layout`` option, else BLNHC (block-outer, NHD inside a
    block, flash-attn's own order) when ``whole_blocks`` is on, else none (vLLM picks)."""
    if options.get("kv_cache_layout"):
        return options["kv_cache_layout"]
    return "BLNHC" if options.get("whole_blocks") else None
