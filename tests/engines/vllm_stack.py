"""vLLM's real Scheduler and the kvport connector's worker side over vLLM's own KV allocation for real attention
layers, stepped the way vLLM's model runner steps a connector. No model forward: a test writes what one would."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1 import KVConnectorRole
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheLayout
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
from vllm.v1.worker.utils import allocate_kv_cache
from vllm_scheduler import connector_vllm_config, finish, new_scheduler

# What vLLM's CPU build resolves for CPU_ATTN (engines.md): block size 128, layout LBHNC.
BLOCK, LAYOUT = 128, "LBHNC"


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """vLLM's one-rank process groups (gloo on loopback), as its in-process executor sets up: the worker side asks
    its tensor-parallel rank and pipeline stage."""
    from vllm.distributed import parallel_state as ps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
        ps.ensure_model_parallel_initialized(1, 1)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


@dataclasses.dataclass
class Stack:
    config: VllmConfig
    kv_cache_config: KVCacheConfig
    kv: dict[str, torch.Tensor]  # what register_kv_caches received
    scheduler: Scheduler
    worker: Any  # the worker-role KVPortConnector

    def step(self, forward: Callable[[Any], None] | None = None, before_worker: Callable[[Any], None] | None = None):
        """One engine step: schedule; ``before_worker(out)`` (between the scheduler's lookup and the worker's load);
        the worker-side connector lifecycle of vLLM's model runner (``_get_kv_connector_output``: bind metadata,
        start_load_kv, [forward: ``forward(out)`` writes the KV], wait_for_save, get_transfer_results,
        get_block_ids_with_load_errors); the runner's output back into the scheduler. Returns (scheduler output,
        the KVConnectorOutput)."""
        out = self.scheduler.schedule()
        if before_worker is not None:
            before_worker(out)
        previous, kv_transfer_state._KV_CONNECTOR_AGENT = kv_transfer_state._KV_CONNECTOR_AGENT, self.worker
        try:
            with (
                set_forward_context(None, self.config),
                KVConnectorModelRunnerMixin._get_kv_connector_output(out) as kv_output,
            ):
                if forward is not None and out.total_num_scheduled_tokens:
                    forward(out)
        finally:
            kv_transfer_state._KV_CONNECTOR_AGENT = previous
        finish(self.scheduler, out, kv_output)
        return out, kv_output

    def block_ids(self, req_id: str) -> tuple[list[int], ...]:
        return self.scheduler.kv_cache_manager.get_block_ids(req_id)

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.connector.shutdown()


def build_stack(
    model: Path,
    extra: dict[str, Any],
    windows: list[int | None],
    heads: int,
    kv_heads: int,
    head_size: int,
    num_blocks: int = 64,
) -> Stack:
    """Real attention layers (``windows``: per layer, its sliding window or None), vLLM's own KV cache groups
    (get_kv_cache_groups), kv_cache_config and allocation; the worker connector built by vLLM's factory and
    bound through register_kv_caches; the scheduler given the worker's handshake. Call inside ``single_rank()``."""
    config = connector_vllm_config(model, extra, BLOCK)
    config.cache_config.kv_cache_layout = LAYOUT
    with set_current_vllm_config(config):
        layers = {
            f"model.layers.{i}.self_attn.attn": Attention(
                heads,
                head_size,
                head_size**-0.5,
                kv_heads,
                cache_config=config.cache_config,
                per_layer_sliding_window=window,
                prefix=f"model.layers.{i}.self_attn.attn",
            )
            for i, window in enumerate(windows)
        }
        specs = {name: layer.get_kv_cache_spec(config) for name, layer in layers.items()}
        groups = get_kv_cache_groups(config, specs)
        page = next(iter(specs.values())).page_size_bytes
        kv_cache_config = get_kv_cache_config_from_groups(config, groups, num_blocks * page * len(windows))
        kv = allocate_kv_cache(kv_cache_config, torch.device("cpu"), KVCacheLayout[LAYOUT])
        config.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        worker = KVConnectorFactory.create_connector(
            config=config, role=KVConnectorRole.WORKER, kv_cache_config=kv_cache_config
        )
        worker.register_kv_caches(kv)
        scheduler = new_scheduler(config, kv_cache_config)
    scheduler.connector.set_xfer_handshake_metadata({0: worker.get_handshake_metadata()})
    return Stack(config, kv_cache_config, kv, scheduler, worker)


def block_content(layer: str, position: int, shape: torch.Size) -> torch.Tensor:
    """The KV a test's 'forward' writes into the block holding tokens [position*BLOCK, (position+1)*BLOCK) of
    ``layer``: reproducible from (layer, block position), so a later engine can check what a load put there."""
    seed = int(layer.split(".")[2]) * 1000 + position
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def write_request_kv(stack: Stack, req_id: str) -> None:
    """Fill every block of the request in every group, as a forward over its whole prompt would."""
    for group, ids in zip(stack.kv_cache_config.kv_cache_groups, stack.block_ids(req_id)):
        for name in group.layer_names:
            view = stack.kv[name]
            for position, block in enumerate(ids):
                view[block] = block_content(name, position, view[block].shape)
