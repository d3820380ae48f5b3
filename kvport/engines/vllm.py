"""vLLM V1 KV connector backed by the kvport cache engine (load with kv_connector="KVPortConnector",
kv_connector_module_path="kvport.engines.vllm"). Owns only the glue to vLLM's hooks; must not contain copy code."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

try:  # vLLM >= 0.32: receive failures reported per request (see _load_async)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - older vLLM
    KVConnectorTransferResults = None

from kvport.engines.stats_file import StatsFile
from kvport.engines.vllm_identity import prompt_of, request_extra, tp_rank_world, worker_namespace
from kvport.engines.vllm_layouts import descriptor_for
from kvport.engines.vllm_options import check_extra_config, required_layout
from kvport.engines.vllm_plan import SchedulerPlan, StepRequest, TransferSpec, metrics_port_for
from kvport.engines.vllm_setup import attention_infos, check_parallelism, route_logs_to_vllm
from kvport.engines.vllm_store_fences import StoreFences, group_blocks, stored_blocks
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
# also sees its L1; across processes it sees the shared tiers only.
_LOCAL_WORKERS: dict[str, Any] = {}


@dataclasses.dataclass
class KVPortMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: the requests whose stores the forward must wait for (``fences``, before
    it), the loads to run before the forward and the stores after it."""

    loads: list[TransferSpec] = dataclasses.field(default_factory=list)
    stores: list[TransferSpec] = dataclasses.field(default_factory=list)
    fences: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KVPortHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler, once after the KV caches are registered: the shard's key namespace. Only the worker
    knows everything the namespace holds (the layout fingerprint, the pipeline stage and its layers, the weights)."""

    namespace: str


class KVPortConnector(KVConnectorBase_V1, SupportsHMA):
    """Scheduler side: prefix lookup and load/store planning. Worker side: descriptor binding and transfers."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        route_logs_to_vllm()
        try:
            options, _, config = check_extra_config(self._kv_transfer_config.kv_connector_extra_config)
            check_parallelism(vllm_config)
        except UserError as exc:
            log.error("kvport: %s", exc)  # one line to find in a long multi-process traceback
            raise
        self._options = options
        rank, _ = tp_rank_world(role == KVConnectorRole.WORKER)
        port = metrics_port_for(config.metrics_port, role == KVConnectorRole.WORKER, rank)
        self._cache_config = dataclasses.replace(config, metrics_port=port)
        if port is not None:  # serving metrics is the host process's job, not the cache's
            from kvport.store.metrics import serve_metrics

            serve_metrics(port, config.metrics_host)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self._block_size = groups[0].kv_cache_spec.block_size if groups else vllm_config.cache_config.block_size
        self._rank = rank
        # The cache engine is built once its namespace is known: by the worker when vLLM registers the KV caches
        # (the layout is known then), by the scheduler when the workers report their namespaces (handshake).
        self._engine: Any = None
        self._engines: list[Any] = []  # scheduler: one per worker shard, all must hold a chunk for a hit
        self._owned: list[Any] = []  # engines this connector built (and closes)
        self._stats_dir = options.get("stats_dir")
        self._stats_file: StatsFile | None = None
        self._extras: dict[str, bytes] = {}
        self._plan: SchedulerPlan | None = None
        self._worker: WorkerSide | None = None
        self._async_stores = options.get("async_stores", True)
        self._fences = StoreFences() if self._async_stores else None  # scheduler side only
        if role == KVConnectorRole.SCHEDULER:
            self._plan = SchedulerPlan(
                self._lookup, self._cache_config.chunk_tokens, self._block_size, _load_async(len(groups))
            )
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

    def _make_engine(self, namespace: str):
        """The one place a connector constructs its cache: the in-process CacheEngine, or the node's `kvport server`
        when the config names one (server: ipc:///...)."""
        from kvport.cache.factory import open_cache

        engine = open_cache(self._cache_config, namespace)
        self._owned.append(engine)
        return engine

    # ==== checks vLLM runs before it starts the engine ======================================================
    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """vLLM asks this while it builds its config (GPU, compiled): the earliest point the extra config can be
        refused, before any model is loaded. Loads and stores run outside the forward: no piecewise graphs needed."""
        check_extra_config(extra_config)
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """vLLM asks this when it resolves the KV cache layout, before memory profiling (every mode): the extra
        config is refused there at the latest. kvport serves every layout vLLM picks (or refuses it at bind); it asks
        for one only when the options name it or want whole blocks (block-outer)."""
        options: dict[str, Any] = {}
        if vllm_config.kv_transfer_config is not None:
            options = check_extra_config(vllm_config.kv_transfer_config.kv_connector_extra_config)[0]
        check_parallelism(vllm_config)
        return required_layout(options)

    # ==== worker side ==========================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            infos = attention_infos(self._vllm_config, self._kv_cache_config)
            descriptor = descriptor_for(infos, kv_caches, self._options)
        except UserError as exc:
            log.error("kvport: %s", exc)  # a layout kvport refuses: one line before vLLM's traceback
            raise
        layers = [name for info in infos for name in info.layer_names]
        namespace = worker_namespace(self._vllm_config, self._options, descriptor.fingerprint, layers)
        self._engine = self._make_engine(namespace)
        self._engine.bind(descriptor)
        _LOCAL_WORKERS[namespace] = self._engine
        self._worker = WorkerSide(
            self._engine, self._block_size, bool(self._options.get("debug_random_load")), self._async_stores
        )
        if self._worker.debug_random_load:
            log.warning("kvport: debug_random_load is ON: loaded KV is replaced by random bytes (test only)")
        log.info(
            "kvport: bound %d layers in %d group(s), attention %s (%s) -> layout %s, copy backend %s, "
            "chunk %d tokens, L1 %s, tiers: %s, namespace %s",
            len(layers),
            len(infos),
            "/".join(sorted({info.backend for info in infos})),
            infos[0].layout,
            descriptor.layout,
            self._engine.backend.name,
            self._cache_config.chunk_tokens,
            _size(self._cache_config.l1_bytes),
            _tiers(self._engine),
            namespace,
        )

    def get_handshake_metadata(self) -> KVPortHandshake | None:
        return KVPortHandshake(self._engine.namespace) if self._engine is not None else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before the forward, before vLLM rewrites blocks it handed out again: order the stream after the stores
        of the requests the scheduler fenced (preempted, or whose stored blocks were reallocated)."""
        if self._worker is not None and isinstance(kv_connector_metadata, KVPortMetadata):
            self._worker.fence(kv_connector_metadata.fences)

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

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """Asynchronous loads issued since the last step (models with several KV cache groups): each one finished,
        the failed ones also in ``failed_recving`` (vLLM recomputes those requests); and the finished requests
        whose asynchronous stores are done (``finished_sending``: vLLM frees their blocks)."""
        if self._worker is None:
            return KVConnectorTransferResults()
        finished, failed = self._worker.take_transfer_results()
        sent = self._worker.finished_stores(finished_req_ids)
        if sent:
            self._write_stats()
        return KVConnectorTransferResults(finished_sending=sent, finished_recving=finished, failed_recving=failed)

    def shutdown(self) -> None:
        if self._engine is not None and _LOCAL_WORKERS.get(self._engine.namespace) is self._engine:
            del _LOCAL_WORKERS[self._engine.namespace]
        owned, self._owned = self._owned, []
        for engine in owned:
            engine.close(drain=True)
        if owned:
            self._write_stats()

    # ==== scheduler side =======================================================================================
    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], Any]) -> None:
        """Every worker's namespace, keyed by (pipeline stage, TP rank): the scheduler looks up all of them (a
        chunk is a hit only when every shard holds it)."""
        if self._plan is None:
            return
        names = list(dict.fromkeys(m.namespace for _, m in sorted(metadata.items()) if isinstance(m, KVPortHandshake)))
        self._engines = [_LOCAL_WORKERS.get(ns) or self._make_engine(ns) for ns in names]
        if not self._engines:
            return
        log.info(
            "kvport: scheduler looks up %d shard namespace(s), chunk %d tokens, tiers: %s, namespace %s%s",
            len(names),
            self._cache_config.chunk_tokens,
            _tiers(self._engines[0]),
            names[0],
            f" (+{len(names) - 1} more)" if len(names) > 1 else "",
        )

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, rank): m for rank, m in metadata.items()})

    def _lookup(self, tokens, start: int, extra: bytes) -> int:
        if not self._engines:
            raise RuntimeError(
                "kvport: the vLLM workers did not report their key namespaces (KV connector handshake metadata); "
                "this vLLM version or executor is not supported by kvport"
            )
        end = None
        for engine in self._engines:  # every shard must hold the chunk: narrow the run shard by shard
            found = engine.lookup(tokens if end is None else tokens[:end], start, extra)
            end = found if end is None else min(end, found)
            if end <= start:
                break
        return end

    def _extra(self, request: Request) -> bytes:
        extra = self._extras.get(request.request_id)
        if extra is None:
            extra = self._extras[request.request_id] = request_extra(request)
        return extra

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = prompt_of(request)
        if not prompt:
            return 0, False
        hit = self._plan.match(
            request.request_id, prompt, num_computed_tokens, request.num_tokens, self._extra(request)
        )
        return hit, bool(hit) and self._plan.load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        prompt = prompt_of(request)
        if prompt:
            block_ids = blocks.get_block_ids() if self._plan.load_async and num_external_tokens else None
            self._plan.after_alloc(request.request_id, prompt, num_external_tokens, self._extra(request), block_ids)

    def update_connector_output(self, connector_output: Any) -> None:
        failed = getattr(connector_output, "failed_recving", None)
        if failed:
            self._plan.load_failed(sorted(failed))

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
        fences = self._fence(scheduler_output, loads, stores)
        if loads or stores or fences:
            self._write_stats()
        return KVPortMetadata(loads, stores, fences)

    def _fence(self, scheduler_output: SchedulerOutput, loads: list, stores: list) -> list[str]:
        """Requests whose in-flight stores read blocks that this step hands out again (to vLLM's new tokens or our
        loads) or that preemption freed; then this step's stores are recorded as in flight."""
        if self._fences is None:
            return []
        allocated = set()
        for new in scheduler_output.scheduled_new_reqs:
            allocated |= group_blocks(new.block_ids)
        for ids in scheduler_output.scheduled_cached_reqs.new_block_ids:
            allocated |= group_blocks(ids)
        for spec in loads:
            allocated |= stored_blocks(spec.block_ids, self._block_size, spec.skip_tokens, spec.num_tokens)
        fences = self._fences.fences(allocated, scheduler_output.preempted_req_ids or ())
        for spec in stores:
            self._fences.stored(
                spec.req_id, stored_blocks(spec.block_ids, self._block_size, spec.skip_tokens, spec.num_tokens)
            )
        return fences

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Synchronous stores ran after the steps that computed each chunk: free the blocks now. Asynchronous ones
        may still read them: vLLM keeps them until the workers report the request (``get_transfer_results``)."""
        self._plan.finished(request.request_id)
        self._extras.pop(request.request_id, None)
        delay = self._fences is not None and self._fences.finished(request.request_id)
        if delay:
            self._write_stats()
        return delay, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, [])

    # ==== stats ================================================================================================
    def stats(self) -> dict[str, Any]:
        if self._plan is not None:
            p = self._plan
            return {
                "role": "scheduler",
                "requests": p.requests,
                "hit_requests": p.hit_requests,
                "hit_tokens": p.hit_tokens,
                "failed_loads": p.failed_loads,
                "load_async": p.load_async,
                "prompt_tokens": p.prompt_tokens,
                "async_stores": self._fences is not None,
                "fenced_requests": self._fences.fenced if self._fences is not None else 0,
                "delayed_frees": self._fences.delayed_frees if self._fences is not None else 0,
                "namespaces": [e.namespace for e in self._engines],
            }
        out: dict[str, Any] = {"role": "worker", "rank": self._rank}
        if self._worker is not None:
            out |= self._worker.stats() | {"namespace": self._engine.namespace}
        return out

    def _write_stats(self) -> None:
        """This side's counters to ``stats_dir`` (kvport.engines.stats_file), when one is configured."""
        if not self._stats_dir:
            return
        if self._stats_file is None:
            self._stats_file = StatsFile(self._stats_dir)
        name = "scheduler.json" if self._plan is not None else f"worker{self._rank}.json"
        self._stats_file.write(name, self.stats())


def _load_async(num_groups: int) -> bool:
    """Load asynchronously when the model has several KV cache groups: vLLM 0.32 raises on per-block load failures
    then (``Scheduler._handle_invalid_blocks``: block ids are unique only within a group) and takes failures per
    request only for asynchronous loads (``failed_recving``; ``_handle_failed_recving`` acts on requests in
    WAITING_FOR_REMOTE_KVS). One group keeps the synchronous load: no step waiting for the load, and a failure
    costs only the blocks from the failed chunk on."""
    if num_groups <= 1:
        return False
    if KVConnectorTransferResults is None:  # pragma: no cover - older vLLM: per-block reports are all it has
        log.warning("kvport: this vLLM cannot report load failures per request; a failed load may stop the engine")
        return False
    return True


def _tiers(engine: Any) -> str:
    tiers = getattr(getattr(engine, "chunks", None), "tiers", None) or []
    return ", ".join(t.describe() for t in tiers) or "none (L1 only)"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
