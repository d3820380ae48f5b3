"""TensorRT-LLM KV cache connector backed by the kvport cache engine: kv_connector_config with connector_module
"kvport.engines.trtllm", connector_scheduler_class "KVPortScheduler", connector_worker_class "KVPortWorker". Owns only
the glue to TensorRT-LLM's hooks (written against its public source at commit 035ab91c; never run against a live
TensorRT-LLM); TensorRT-LLM's base classes are imported when those two names are first read, nowhere else."""

from __future__ import annotations

import logging
import os
from typing import Any

from kvport.engines.trtllm_plan import TrtllmMetadata, TrtllmPlan
from kvport.errors import UserError

log = logging.getLogger("kvport.trtllm")

# Adapter settings (kv_connector_config has no free-form section): the cache itself reads $KVPORT_CONFIG and
# KVPORT_<FIELD> (kvport.cache.config).
NAMESPACE_ENV = "KVPORT_NAMESPACE"  # replaces the model identity in keys, e.g. to share KV with another engine
LAYOUT_ENV = "KVPORT_TRTLLM_LAYOUT"  # a catalog name or spec file replacing the attention-backend default
# "1": chunks of whole pool blocks, every layer (kvport.layouts.whole_blocks): one copy per block, the copy engines'
# speed under load; such chunks are read back only by the same pool layout (keyed apart by their fingerprint).
WHOLE_BLOCKS_ENV = "KVPORT_TRTLLM_WHOLE_BLOCKS"


def _whole_blocks() -> bool:
    """The switch, read as the cache's own KVPORT_* booleans are (unset or empty: off)."""
    from kvport.cache.config import coerce_bool

    return coerce_bool(os.environ.get(WHOLE_BLOCKS_ENV, "").strip() or "0", f"${WHOLE_BLOCKS_ENV}")


def _rank() -> int:
    try:
        from tensorrt_llm._utils import mpi_rank
    except ImportError:  # the CPU driver tests: one rank
        return 0
    return int(mpi_rank())


def _worker_engine(llm_args: Any, info: Any, fingerprint: str) -> Any:
    from kvport.cache import CacheEngine, load_config
    from kvport.engines.trtllm_layouts import namespace

    config = load_config()
    ns = namespace(llm_args, info.dtype, _rank(), fingerprint, info.layers, os.environ.get(NAMESPACE_ENV))
    return CacheEngine(config, ns)


class WorkerCore:
    """The worker hooks, in the order TensorRT-LLM's executor calls them: register_kv_caches once; per step
    bind_connector_meta, start_load_kv, (per layer) wait_for_layer_load and save_kv_layer, wait_for_save,
    get_finished."""

    def __init__(self, llm_args: Any) -> None:
        self.llm_args = llm_args
        self.engine = None
        self.side = None
        self._meta: TrtllmMetadata | None = None

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        from kvport.engines.trtllm_layouts import load_spec, pool_info
        from kvport.engines.vllm_worker import WorkerSide
        from kvport.layouts import compile_descriptor

        info = pool_info(kv_cache_tensor, self.llm_args)
        spec = load_spec(info, os.environ.get(LAYOUT_ENV))
        descriptor = compile_descriptor(spec, kv_cache_tensor)
        if _whole_blocks():
            from kvport.layouts import LayoutError
            from kvport.layouts.whole_blocks import whole_blocks

            try:
                descriptor = whole_blocks(descriptor)
            except LayoutError as exc:
                raise UserError(f"kvport TensorRT-LLM connector: ${WHOLE_BLOCKS_ENV}: {exc}") from None
        engine = _worker_engine(self.llm_args, info, descriptor.fingerprint)
        try:
            engine.bind(descriptor)
        except BaseException:
            engine.close(drain=False)
            raise
        self.engine = engine
        self.side = WorkerSide(engine, info.tokens_per_block)
        _LOCAL_ENGINES[engine.namespace] = engine
        log.info(
            "kvport: TensorRT-LLM pool %s, %d layers, %d tokens/block, %s attention -> layout %s, namespace %s",
            tuple(kv_cache_tensor.shape),
            info.layers,
            info.tokens_per_block,
            info.backend,
            descriptor.layout,
            engine.namespace,
        )

    def bind_connector_meta(self, metadata: object) -> None:
        self._meta = metadata if isinstance(metadata, TrtllmMetadata) else None

    def start_load_kv(self, stream: Any) -> None:
        """Scatter each load's cached chunks into its blocks, ordered before the forward on the current stream. A
        load that falls short (a chunk evicted or corrupt since the lookup) raises: TensorRT-LLM's connector API has
        no way to ask for a recompute, and the forward must not read blocks kvport did not fill."""
        if self._meta is None or not self._meta.loads or self.side is None:
            return
        failures = self.side.counters["load_failures"]
        self.side.load(self._meta.loads)
        if self.side.counters["load_failures"] != failures:
            self.side.take_invalid_blocks()
            raise RuntimeError(
                "kvport: a cached chunk promised to TensorRT-LLM could not be loaded (evicted or failed its "
                "checksum); TensorRT-LLM's connector API cannot recompute it, so the step stops here"
            )

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return  # start_load_kv ordered the forward's stream after every load (no host wait)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return  # whole-step stores in wait_for_save: one gather per chunk instead of one per layer

    def wait_for_save(self, stream: Any) -> None:
        if self._meta is not None and self._meta.stores and self.side is not None:
            self.side.store(self._meta.stores)
        self._meta = None

    def get_finished(self, finished_gen_req_ids: list, started_loading_req_ids: list) -> tuple[list, list]:
        return [], []  # no asynchronous saves or loads: request_finished answers False, matches are synchronous

    def stats(self) -> dict[str, Any]:
        return self.side.stats() if self.side is not None else {}

    def shutdown(self) -> None:
        if self.engine is not None:
            _LOCAL_ENGINES.pop(self.engine.namespace, None)
            self.engine.close(drain=True)
            self.engine = None


# Worker engines of this process by namespace: the scheduler lives on rank 0 beside rank 0's worker, and looks up
# through that worker's engine (its L1 too); otherwise it opens the tiers itself.
_LOCAL_ENGINES: dict[str, Any] = {}


class SchedulerCore:
    """The scheduler hooks (rank 0): get_num_new_matched_tokens, update_state_after_alloc, build_connector_meta,
    request_finished; planning is kvport's vLLM planning (kvport.engines.trtllm_plan)."""

    def __init__(self, llm_args: Any) -> None:
        from kvport.cache import load_config

        self.llm_args = llm_args
        self.config = load_config()
        cache = getattr(llm_args, "kv_cache_config", None)
        tokens = int(getattr(cache, "tokens_per_block", None) or 32)
        if self.config.chunk_tokens % tokens:
            raise UserError(
                f"kvport TensorRT-LLM connector: chunk_tokens={self.config.chunk_tokens} is not a multiple of "
                f"tokens_per_block={tokens}"
            )
        self._warned = False
        self.planner = TrtllmPlan(self._lookup, self.config.chunk_tokens, tokens)

    def _lookup(self, tokens, start: int = 0, extra: bytes = b"") -> int:
        """Where the cached run from token ``start`` ends (SchedulerPlan's lookup contract, as CacheEngine.lookup).
        TensorRT-LLM runs the scheduler on rank 0 beside rank 0's worker, which registered its pool (and opened the
        cache) when the executor started; without it nothing can be loaded anyway."""
        if len(_LOCAL_ENGINES) != 1:
            if not self._warned:
                log.warning("kvport: %d worker caches in this process; every request misses", len(_LOCAL_ENGINES))
                self._warned = True
            return start
        return next(iter(_LOCAL_ENGINES.values())).lookup(tokens, start, extra)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self.planner.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list) -> None:
        self.planner.update_state_after_alloc(request, block_ids)

    def build_connector_meta(self, scheduler_output: Any) -> TrtllmMetadata:
        return self.planner.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, cache_block_ids: list) -> bool:
        return self.planner.request_finished(request, cache_block_ids)


def _subclass(name: str) -> type:
    """KVPortScheduler / KVPortWorker: the cores on TensorRT-LLM's own base classes (imported now)."""
    try:
        from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import (
            KvCacheConnectorScheduler,
            KvCacheConnectorWorker,
        )
    except ImportError as exc:
        raise ImportError(f"kvport.engines.trtllm.{name} needs TensorRT-LLM installed ({exc})") from exc
    if name == "KVPortWorker":
        core, base = WorkerCore, KvCacheConnectorWorker
    else:
        core, base = SchedulerCore, KvCacheConnectorScheduler

    def __init__(self, llm_args: Any) -> None:
        base.__init__(self, llm_args)
        core.__init__(self, llm_args)

    return type(name, (core, base), {"__init__": __init__, "__module__": __name__})


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    if name in ("KVPortScheduler", "KVPortWorker"):
        if name not in _CLASSES:
            _CLASSES[name] = _subclass(name)
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
