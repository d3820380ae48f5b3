"""SGLang HiCache storage backend backed by the kvport cache engine: --hicache-storage-backend dynamic with
{"backend_name": "kvport", "module_path": "kvport.engines.sglang", "class_name": "KVPortHiCacheStorage",
"interface_v1": 1, ...}. Owns only the glue to SGLang's storage hooks; must not contain copy or storage code."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvport.engines.sglang_layouts import check_parallelism, info_from_pool, load_spec, namespace
from kvport.errors import UserError
from kvport.store.page_keys import key_for_page_hash

if TYPE_CHECKING:
    from kvport.cache.engine import CacheEngine

log = logging.getLogger("kvport.sglang")

# extra_config keys SGLang's dynamic loader reads itself (storage/backend_factory.py, cache_controller.py).
SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")
# extra_config keys this adapter reads; every other key is a cache setting (kvport.cache.config).
ADAPTER_KEYS = ("config", "namespace")
# The pool SGLang registers the KV under (hicache_storage.PoolName.KV); other pools (Mamba, SWA, DSA indexer, ...)
# are hybrid-model sidecars kvport does not store.
KV_POOL = "kv"


def split_extra_config(extra: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter options, cache-config overrides) from SGLang's storage extra_config."""
    extra = {k: v for k, v in (extra or {}).items() if k not in SGLANG_KEYS}
    options = {k: extra.pop(k) for k in ADAPTER_KEYS if k in extra}
    return options, extra


class KVPortHiCacheStorage(HiCacheStorage):
    """SGLang's L3: pages of the host pool move to and from kvport's chunk store, one chunk per page (chunk_tokens
    is SGLang's page size), keyed by SGLang's page hashes (key_scheme sglang)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        from kvport.cache import load_config

        extra = storage_config.extra_config or {}
        if not extra.get("interface_v1"):
            raise UserError(
                'kvport SGLang storage backend: set "interface_v1": 1 in --hicache-storage-backend-extra-config '
                "(kvport moves pages in place; the copying interface is not implemented)"
            )
        check_parallelism(storage_config)
        self.storage_config = storage_config
        self._options, self._overrides = split_extra_config(extra)
        self._config = load_config(self._options.get("config"), self._overrides)
        self._engine: CacheEngine | None = None
        self.page_size = 0
        self.namespace: str | None = None

    # ---- registration (SGLang calls these once, before any I/O) -------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        from kvport.cache import CacheEngine
        from kvport.layouts import compile_descriptor

        info = info_from_pool(mem_pool_host)
        spec = load_spec(info)
        if getattr(mem_pool_host, "kv_buffer", None) is None:
            raise UserError("kvport SGLang storage backend: the host pool holds no KV buffer (allocator-only MLA pool)")
        config = self._config
        explicit = "chunk_tokens" in self._overrides or config.chunk_tokens != type(config)().chunk_tokens
        if explicit and config.chunk_tokens != info.page_size:
            raise UserError(
                f"kvport SGLang storage backend: chunk_tokens={config.chunk_tokens} but SGLang's page size is "
                f"{info.page_size}; kvport stores one chunk per SGLang page (leave chunk_tokens unset)"
            )
        if "key_scheme" in self._overrides and config.key_scheme != "sglang":
            raise UserError(
                f"kvport SGLang storage backend: key_scheme={config.key_scheme!r}; SGLang hands page hashes, so "
                "keys derive from them (key_scheme sglang)"
            )
        config = dataclasses.replace(config, chunk_tokens=info.page_size, key_scheme="sglang")
        if not config.tier_specs():
            log.warning("kvport: no tiers (l2_path or tiers): pages live in this process's L1 only")
        self.page_size = info.page_size
        descriptor = compile_descriptor(spec, mem_pool_host.kv_buffer)
        self.namespace = namespace(self.storage_config, info, descriptor.fingerprint, self._options.get("namespace"))
        engine = CacheEngine(config, self.namespace)
        try:
            engine.bind(descriptor)
        except BaseException:
            engine.close(drain=False)
            raise
        self._engine = engine
        log.info(
            "kvport: SGLang host pool %s %s, %d layers, page %d -> layout %s, copy backend %s, namespace %s",
            info.pool,
            info.layout,
            info.layers,
            info.page_size,
            spec.name,
            engine.backend.name,
            self.namespace,
        )

    def on_host_pools_registered(self) -> None:
        others = sorted(str(name) for name in getattr(self, "registered_pools", {}) if str(name) != KV_POOL)
        if others:
            raise UserError(
                f"kvport SGLang storage backend: host pools {', '.join(others)} (hybrid model state) are not stored "
                "by kvport; use it with plain MHA or MLA models"
            )

    # ---- the zero-copy interface (interface_v1) ----------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """Leading pages of ``keys`` kvport holds."""
        return self._bound().lookup_keys(self._keys(keys))

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Store the pages at ``host_indices`` (page_size indices per key). True for a page held afterwards."""
        engine, ours, blocks, usable = self._pages(keys, host_indices)
        if usable:
            # wait(): SGLang may reuse the host pages once this returns; the gather into L1 is done by then.
            engine.submit_store_keys(ours[:usable], blocks[:usable]).wait()
        l1 = engine.chunks.l1
        return [i < usable and (l1.contains(k) or engine.lookup_keys([k]) == 1) for i, k in enumerate(ours)]

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Load the leading pages kvport holds into the host pool at ``host_indices``; True for each loaded page."""
        engine, ours, blocks, usable = self._pages(keys, host_indices)
        loaded = engine.submit_load_keys(ours[:usable], blocks[:usable]).wait() if usable else 0
        pages = loaded // self.page_size
        return [i < pages for i in range(len(keys))]

    def _pages(self, keys: list[str], host_indices: torch.Tensor):
        """(bound engine, kvport keys, per-page host blocks, how many leading pages can move) for a batch call."""
        engine = self._bound()  # first: the clear error when register_mem_pool_host was not called
        ours = self._keys(keys)
        blocks = self._blocks(host_indices, len(keys))
        return engine, ours, blocks, _leading(blocks, ours)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- the copying interface: refused (interface_v1 is required at construction) ----------------------------
    def get(self, key, target_location=None, target_sizes=None):
        raise NotImplementedError("kvport SGLang storage backend: only interface_v1 (batch_get_v1) is implemented")

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        raise NotImplementedError("kvport SGLang storage backend: only interface_v1 (batch_get_v1) is implemented")

    def set(self, key, value=None, target_location=None, target_sizes=None):
        raise NotImplementedError("kvport SGLang storage backend: only interface_v1 (batch_set_v1) is implemented")

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        raise NotImplementedError("kvport SGLang storage backend: only interface_v1 (batch_set_v1) is implemented")

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self._engine.stats() if self._engine is not None else {}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close(drain=True)
            self._engine = None

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _bound(self) -> CacheEngine:
        if self._engine is None:
            raise RuntimeError("kvport SGLang storage backend: register_mem_pool_host was not called")
        return self._engine

    def _keys(self, page_hashes: list[str]) -> list[str | None]:
        """kvport keys for SGLang's page hashes; None for a key that is not a page hash (then a miss)."""
        out: list[str | None] = []
        for page_hash in page_hashes:
            try:
                out.append(key_for_page_hash(str(page_hash), self.namespace, self._engine.config.salt))
            except ValueError:
                log.warning("kvport: SGLang key %r is not a page hash; treated as a miss", str(page_hash)[:80])
                out.append(None)
        return out

    def _blocks(self, host_indices: torch.Tensor, pages: int) -> list[int | None]:
        """The host-pool page of each key: its page_size indices must be one whole page in order, else None."""
        size = self.page_size
        idx = torch.as_tensor(host_indices).to(device="cpu", dtype=torch.int64).reshape(-1)
        if idx.numel() != pages * size:
            log.warning("kvport: %d host indices for %d pages of %d tokens; nothing moved", idx.numel(), pages, size)
            return [None] * pages
        idx = idx.view(pages, size)
        first = idx[:, 0]
        whole = (first % size == 0) & (idx == first[:, None] + torch.arange(size)).all(dim=1)
        return [int(f) // size if ok else None for f, ok in zip(first.tolist(), whole.tolist())]


def _leading(blocks: list[int | None], keys: list[str | None]) -> int:
    """Pages from the start that have both a whole host page and a key (kvport moves leading runs only)."""
    for i, (block, key) in enumerate(zip(blocks, keys)):
        if block is None or key is None:
            return i
    return len(keys)
