"""Drives vLLM's real V1 Scheduler with the kvport connector (no model, no worker): requests in, scheduler outputs and
the connector's load/store specs out. Our own minimal helper in the manner of vLLM's tests/v1/kv_connector/unit."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from kvport.cache import CacheEngine, load_config
from kvport.demo.driver import kvport_transfer_config
from kvport.engines.key_namespace import namespace_for
from kvport.engines.vllm import KVPortHandshake
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.testing.kv import nhd_kv

BLOCK = 16
NAMESPACE = namespace_for("", None, base="scheduler-test")
_ids = itertools.count()
init_none_hash(sha256)


def tiny_model(root: Path) -> Path:
    """The one-layer model the scheduler tests hand vLLM's config (no forward runs: only its config is read)."""
    from kvport.demo.model import ModelDims, build_model

    dims = ModelDims(layers=1, hidden=64, heads=2, kv_heads=2, intermediate=128, vocab=512)
    return build_model(root / "model", dims)


def prompt_tokens(n: int, seed: int) -> list[int]:
    """``n`` reproducible token ids inside the tiny model's vocabulary."""
    return torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_scheduler(
    model: Path, extra: dict[str, Any], num_blocks: int = 1000, shards: dict[tuple[int, int], str] | None = None
) -> Scheduler:
    """vLLM's Scheduler with prefix caching on, chunked prefill, the kvport connector, one full-attention group; the
    workers' namespace handshake (``shards``: (pp stage, tp rank) -> namespace) is delivered as vLLM's engine core
    does after KV cache registration."""
    vllm_config = connector_vllm_config(model, extra, BLOCK)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.bfloat16)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    scheduler = new_scheduler(vllm_config, kv_cache_config)
    shards = shards or {(0, 0): NAMESPACE}
    scheduler.connector.set_xfer_handshake_metadata_pp_aware({k: KVPortHandshake(v) for k, v in shards.items()})
    return scheduler


def connector_vllm_config(model: Path, extra: dict[str, Any], block_size: int) -> VllmConfig:
    """vLLM's config with prefix caching on, chunked prefill and the kvport connector (recompute on load failure)."""
    model_config = ModelConfig(model=str(model), dtype="bfloat16", seed=0, enable_prompt_embeds=True)
    return VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=4096,
            max_model_len=4096,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
        kv_transfer_config=kvport_transfer_config(extra),
        device_config=DeviceConfig("cpu"),
    )


def new_scheduler(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Scheduler:
    block = vllm_config.cache_config.block_size
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block,
        hash_block_size=block,
        log_stats=True,
    )


def fill_cache(extra: dict[str, Any], tokens: list[int], request_extra: bytes = b"", namespace: str = NAMESPACE) -> int:
    """Store every full chunk of ``tokens`` under ``namespace`` (as a worker would), from hand-built KV."""
    kv, desc = nhd_kv(num_blocks=len(tokens) // BLOCK + 1, block_size=BLOCK, seed=1)
    config = load_config(overrides={k: v for k, v in extra.items() if k != "stats_dir"}, environ={})
    with CacheEngine(config, namespace) as engine:
        engine.bind(desc, TorchBackend())
        stored = engine.store(tokens, list(range(len(tokens) // BLOCK + 1)), extra=request_extra)
        engine.flush()
    return stored


def request(tokens: list[int] | None, max_tokens: int = 1, block_size: int = BLOCK, **kwargs: Any) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(
        request_id=f"req-{next(_ids)}",
        prompt_token_ids=tokens,
        sampling_params=params,
        pooling_params=None,
        block_hasher=get_request_block_hasher(block_size, sha256),
        **kwargs,
    )


def schedule(scheduler: Scheduler, req: Request) -> tuple[int, Any]:
    """Add ``req``, run one scheduling step: (tokens vLLM counts as computed before the step: its own prefix-cache
    hit plus kvport's, the connector's metadata)."""
    scheduler.add_request(req)
    out = scheduler.schedule()
    [new] = [r for r in out.scheduled_new_reqs if r.req_id == req.request_id]
    return new.num_computed_tokens, out


def finish(scheduler: Scheduler, out: Any, kv_connector_output: Any = None) -> None:
    """Complete a scheduled step as a model runner would (one sampled token per request that reached the end of
    its prompt: max_tokens=1 ends it)."""
    ids = list(out.num_scheduled_tokens)
    # schedule() already advanced num_computed_tokens by the tokens it scheduled
    done = {i: scheduler.requests[i].num_computed_tokens >= scheduler.requests[i].num_prompt_tokens for i in ids}
    runner = ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7] if done[r] else [] for r in ids],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
        kv_connector_output=kv_connector_output,
    )
    scheduler.update_from_output(out, runner)
