"""vLLM V1 KV connector backed by the kvport cache engine (load with kv_connector="KVPortConnector",
kv_connector_module_path="kvport.engines.vllm"). Owns only the glue to vLLM's hooks; must not contain copy code."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from kvport.engines.vllm_layouts import AttentionInfo, info_from_spec, namespace_for, spec_for, tensors_in_order
from kvport.engines.vllm_plan import SchedulerPlan, StepRequest, TransferSpec, metrics_port_for
from kvport.engines.vllm_worker import WorkerSide
from kvport.errors import UserError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvport.vllm")

# Bound worker-side engines of this process by namespace. When vLLM runs the scheduler and the worker in one process
# (one device: engine core with the in-process executor), the scheduler looks up through the worker's engine and so
# also sees its L1; across processes it sees the shared L2 only.
_LOCAL_WORKERS: dict[str, Any] = {}

# kv_connector_extra_config keys the adapter itself reads; every other key is a cache setting (kvport.cache.config).
ADAPTER_KEYS = ("config", "layout", "namespace", "stats_dir", "debug_random_load")


@dataclasses.dataclass
class KVPortMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the loads to run before the forward and the stores after it."""

    loads: list[TransferSpec] = dataclasses.field(default_factory=list)
    stores: list[TransferSpec] = dataclasses.field(default_factory=list)


def split_extra_config(extra: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter options, cache-config overrides) from kv_connector_extra_config."""
    extra = dict(extra or {})
    options = {k: extra.pop(k) for k in ADAPTER_KEYS if k in extra}
    return options, extra


class KVPortConnector(KVConnectorBase_V1, SupportsHMA):
    """Scheduler side: prefix lookup and load/store planning. Worker side: descriptor binding and transfers."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from kvport.cache import load_config
        from kvport.cache.factory import open_cache

        options, overrides = split_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self._options = options
        rank, world = _tp_rank_world(role)
        config = load_config(options.get("config"), overrides)
        port = metrics_port_for(config.metrics_port, role == KVConnectorRole.WORKER, rank)
        self._cache_config = dataclasses.replace(config, metrics_port=port)
        if port is not None:  # serving metrics is the host process's job, not the cache's
            from kvport.store.metrics import serve_metrics

            serve_metrics(port, config.metrics_host)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self._block_size = groups[0].kv_cache_spec.block_size if groups else vllm_config.cache_config.block_size
        self._rank = rank
        # The in-process cache, or the node's `kvport server` when the config names one (server: ipc:///...).
        self._engine = open_cache(self._cache_config, _namespace(vllm_config, options, rank, world))
        self._stats_dir = options.get("stats_dir")
        self._plan: SchedulerPlan | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._plan = SchedulerPlan(self._lookup, self._cache_config.chunk_tokens, self._block_size)
            if not self._cache_config.tier_specs() and not self._cache_config.server:
                log.warning(
                    "kvport: no tiers (l2_path or tiers): only a worker in this process can serve hits (from its L1); "
                    "engines in "
                    "other processes and restarts see nothing"
                )
            if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
                log.warning(
                    "kvport: kv_load_failure_policy=%s: a chunk that fails its checksum fails the request; "
                    "set kv_load_failure_policy='recompute' to recompute it instead",
                    self._kv_transfer_config.kv_load_failure_policy,
                )

    # ==== worker side ==========================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from kvport.layouts import compile_descriptor

        infos = _attention_infos(self._vllm_config, self._kv_cache_config)
        # One catalog spec per KV cache group (hybrid full + sliding window models have several), combined; an
        # explicit `layout` option replaces the whole mapping and must then describe every group.
        spec = spec_for(infos, self._options.get("layout"))
        per_group = [tensors_in_order(kv_caches, info.layer_names) for info in infos]
        descriptor = compile_descriptor(spec, per_group[0] if len(per_group) == 1 else per_group)
        self._engine.bind(descriptor)
        _LOCAL_WORKERS[self._engine.namespace] = self._engine
        self._worker = WorkerSide(self._engine, self._block_size, bool(self._options.get("debug_random_load")))
        if self._worker.debug_random_load:
            log.warning("kvport: debug_random_load is ON: loaded KV is replaced by random bytes (test only)")
        log.info(
            "kvport: bound %d layers in %d group(s), backend %s, layout %s -> %s, copy backend %s, chunk %d tokens",
            sum(len(info.layer_names) for info in infos),
            len(infos),
            "/".join(sorted({info.backend for info in infos})),
            infos[0].layout,
            spec.name,
            self._engine.backend.name,
            self._cache_config.chunk_tokens,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._worker is not None and isinstance(meta, KVPortMetadata) and meta.loads:
            self._worker.load(meta.loads)
            self._write_stats()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv ordered the forward's stream after every load (no host wait)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole-step stores in wait_for_save: one gather per chunk instead of one per layer

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if self._worker is None or not isinstance(meta, KVPortMetadata) or not meta.stores:
            return
        self._worker.store(meta.stores)
        self._write_stats()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_invalid_blocks() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._engine is not None:
            if _LOCAL_WORKERS.get(self._engine.namespace) is self._engine:
                del _LOCAL_WORKERS[self._engine.namespace]
            self._engine.close(drain=True)
            self._write_stats()

    # ==== scheduler side =======================================================================================
    def _lookup(self, tokens) -> int:
        # Through the server every process sees every other's chunks; in-process, this process's worker's L1.
        engine = self._engine if self._cache_config.server else _LOCAL_WORKERS.get(self._engine.namespace, self._engine)
        return engine.lookup(tokens)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        return self._plan.match(request.request_id, prompt, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.prompt_token_ids:
            self._plan.after_alloc(request.request_id, request.prompt_token_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = scheduler_output.num_scheduled_tokens
        blocks = self._kv_cache_manager.get_block_ids  # all of the request's blocks, not only this step's new ones
        steps, prompts = [], {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids:
                prompts[new.req_id] = new.prompt_token_ids
            steps.append(
                StepRequest(new.req_id, new.num_computed_tokens, scheduled.get(new.req_id, 0), blocks(new.req_id))
            )
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, before in zip(cached.req_ids, cached.num_computed_tokens):
            steps.append(StepRequest(req_id, before, scheduled.get(req_id, 0), blocks(req_id)))
        loads, stores = self._plan.build(steps, prompts)
        if loads or stores:
            self._write_stats()
        return KVPortMetadata(loads, stores)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Stores ran after the steps that computed each chunk, so nothing is left to save: free the blocks now.
        self._plan.finished(request.request_id)
        return False, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._plan.finished(request.request_id)
        return False, None

    # ==== stats ================================================================================================
    def stats(self) -> dict[str, Any]:
        if self._plan is not None:
            p = self._plan
            return {
                "role": "scheduler",
                "requests": p.requests,
                "hit_requests": p.hit_requests,
                "hit_tokens": p.hit_tokens,
                "prompt_tokens": p.prompt_tokens,
            }
        out = {"role": "worker", "rank": self._rank}
        if self._worker is not None:
            out |= self._worker.stats()
        return out

    def _write_stats(self) -> None:
        """Atomically write this side's counters to ``stats_dir`` (for tests, the demo and dashboards)."""
        if not self._stats_dir:
            return
        directory = Path(self._stats_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = "scheduler.json" if self._plan is not None else f"worker{self._rank}.json"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        with os.fdopen(fd, "w") as out:
            json.dump(self.stats(), out, default=str)
        os.replace(tmp, directory / name)


def _tp_rank_world(role: KVConnectorRole) -> tuple[int, int]:
    if role != KVConnectorRole.WORKER:
        return 0, 1  # every rank stores the same chunks (per its shard); rank 0's presence stands for all
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _namespace(vllm_config: VllmConfig, options: dict[str, Any], rank: int, world: int) -> str:
    model = vllm_config.model_config
    dtype = vllm_config.cache_config.cache_dtype
    if dtype == "auto":
        dtype = str(model.dtype).removeprefix("torch.")
    world = max(world, vllm_config.parallel_config.tensor_parallel_size)
    return namespace_for(model.model, model.revision, dtype, rank, world, options.get("namespace"))


def _attention_infos(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> list[AttentionInfo]:
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
