"""A driver that calls kvport's TensorRT-LLM connector hooks in the order TensorRT-LLM's executor does (PyExecutor and
KvCacheConnectorManager at commit 035ab91c), with a pool tensor of the shape its KVCacheManager hands
register_kv_caches. TensorRT-LLM cannot be installed here: the request, argument and scheduler-output objects below
carry the field names of its public source, and nothing else of it is imitated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from kvport.engines.trtllm import SchedulerCore, WorkerCore


@dataclasses.dataclass
class Request:
    """What the hooks read of TensorRT-LLM's LlmRequest: request_id and get_tokens(beam)."""

    request_id: int
    tokens: list[int]

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens)


@dataclasses.dataclass
class RequestData:  # kv_cache_connector.RequestData (the fields kvport reads)
    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclasses.dataclass
class SchedulerOutput:  # kv_cache_connector.SchedulerOutput
    new_requests: list[RequestData] = dataclasses.field(default_factory=list)
    cached_requests: list[RequestData] = dataclasses.field(default_factory=list)


def llm_args(model_dir: Path, *, kv_heads: int, head_dim: int, tokens_per_block: int, attn_backend: str = "TRTLLM"):
    """TorchLlmArgs' fields the connector reads, and a model directory with the config.json TensorRT-LLM loads."""
    model_dir.mkdir(parents=True, exist_ok=True)
    config = {"num_attention_heads": 4 * kv_heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    (model_dir / "config.json").write_text(json.dumps(config | {"hidden_size": 4 * kv_heads * head_dim}))
    cache = type("KvCacheConfig", (), {"tokens_per_block": tokens_per_block})()
    fields = {"model": str(model_dir), "tensor_parallel_size": 1, "attn_backend": attn_backend, "revision": None}
    return type("TorchLlmArgs", (), fields | {"kv_cache_config": cache})()


def layer_view(pool: torch.Tensor, layer: int, kv_heads: int, head_dim: int, nhd: bool) -> torch.Tensor:
    """One layer of the pool as TensorRT-LLM's KVCacheManager.get_buffers reshapes it: [blocks, 2, heads, tokens,
    head_dim] for kv_layout="HND" (the TRTLLM attention backend), [blocks, 2, tokens, heads, head_dim] for "NHD"."""
    tokens = pool.shape[3] // (kv_heads * head_dim)
    shape = (tokens, kv_heads) if nhd else (kv_heads, tokens)
    return pool[:, layer].reshape(pool.shape[0], 2, *shape, head_dim)


def attention_writes(pool, layer, blocks, first, last, kv, kv_heads, head_dim, nhd) -> None:
    """What the attention kernel leaves in the pool for tokens [first, last) of one layer: kv[0]/kv[1] are
    [tokens, heads, head_dim]; token t sits in block blocks[t // tokens_per_block] at offset t % tokens_per_block."""
    view = layer_view(pool, layer, kv_heads, head_dim, nhd)
    per_block = view.shape[3] if not nhd else view.shape[2]
    for t in range(first, last):
        b, o = blocks[t // per_block], t % per_block
        for c in range(2):
            if nhd:
                view[b, c, o] = kv[c][t]
            else:
                view[b, c, :, o] = kv[c][t]


@dataclasses.dataclass
class Executor:
    """One rank's PyExecutor as far as the connector sees it: a pool, a block allocator, the two connector halves."""

    pool: torch.Tensor
    args: Any
    kv_heads: int
    head_dim: int
    nhd: bool = False
    stream: Any = None
    calls: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.worker = WorkerCore(self.args)
        self.worker.register_kv_caches(self.pool)  # _maybe_init_kv_connector_manager, at executor start
        self.scheduler = SchedulerCore(self.args)
        self.free = list(range(self.pool.shape[0]))
        self.tokens_per_block = self.pool.shape[3] // (self.kv_heads * self.head_dim)

    def run_prompt(self, request: Request, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Context phase of one request in one step (no local prefix reuse), then request_finished."""
        prompt = request.get_tokens(0)
        matched, is_async = self.scheduler.get_num_new_matched_tokens(request, 0)
        assert not is_async
        need = -(-len(prompt) // self.tokens_per_block)
        blocks, self.free = self.free[:need], self.free[need:]
        self.scheduler.update_state_after_alloc(request, blocks)
        # build_scheduler_output: computed_position leaves out the connector's matched tokens.
        data = RequestData(request.request_id, list(prompt), list(blocks), 0, len(prompt) - matched)
        meta = self.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data]))
        self.worker.bind_connector_meta(meta)  # handle_metadata
        self.worker.start_load_kv(self.stream)
        for layer in range(self.pool.shape[1]):  # the decoder layers' pre/post forward hooks
            self.worker.wait_for_layer_load(layer, self.stream)
            attention_writes(
                self.pool,
                layer,
                blocks,
                matched,
                len(prompt),
                kv_per_layer[layer],
                self.kv_heads,
                self.head_dim,
                self.nhd,
            )
            self.worker.save_kv_layer(layer, self.stream)
        self.worker.wait_for_save(self.stream)
        saving, loading = self.worker.get_finished([], [])
        assert (saving, loading) == ([], [])
        assert self.scheduler.request_finished(request, blocks) is False
        return {"matched": matched, "blocks": blocks, "loads": len(meta.loads), "stores": len(meta.stores)}

    def close(self) -> None:
        self.worker.shutdown()
