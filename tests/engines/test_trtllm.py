"""kvport's TensorRT-LLM connector driven hook by hook in TensorRT-LLM's executor order (tests/engines/trtllm_driver.py)
with a pool tensor of the shape its KVCacheManager registers, on the CPU (and on a GPU under the `gpu` marker).
No TensorRT-LLM is installed: this proves kvport's side of the interface, not a running engine."""

from __future__ import annotations

import json

import pytest
import torch
from trtllm_driver import Executor, Request, RequestData, SchedulerOutput, layer_view, llm_args

from kvport.errors import UserError

HEADS, HEAD_DIM, TPB, LAYERS = 2, 16, 32, 3


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """kvport's cache settings as a TensorRT-LLM deployment passes them: KVPORT_* environment variables."""
    monkeypatch.setenv("KVPORT_CHUNK_TOKENS", "64")
    monkeypatch.setenv("KVPORT_L1_BYTES", "16MiB")
    monkeypatch.setenv("KVPORT_ASYNC_STORE", "false")
    monkeypatch.setenv("KVPORT_TIERS", f"[{{type: local_disk, path: {tmp_path / 'l2'}, bytes: 64MiB}}]")
    return tmp_path


def kv_data(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(count, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16) for _ in range(2))
        for _ in range(LAYERS)
    ]


def make_executor(tmp_path, device="cpu", backend="TRTLLM", blocks=16):
    pool = torch.zeros(blocks, LAYERS, 2, HEADS * TPB * HEAD_DIM, dtype=torch.bfloat16, device=device)
    args = llm_args(tmp_path / "model", kv_heads=HEADS, head_dim=HEAD_DIM, tokens_per_block=TPB, attn_backend=backend)
    stream = torch.cuda.current_stream() if device != "cpu" else None
    return Executor(pool, args, HEADS, HEAD_DIM, nhd=backend != "TRTLLM", stream=stream)


def check_loaded(executor, blocks, kv, tokens: int) -> None:
    """Tokens [0, tokens) of the request are in its blocks as the attention kernel would have written them."""
    for layer in range(LAYERS):
        view = layer_view(executor.pool, layer, HEADS, HEAD_DIM, executor.nhd).cpu()
        for t in range(tokens):
            b, o = blocks[t // TPB], t % TPB
            for c in range(2):
                got = view[b, c, o] if executor.nhd else view[b, c, :, o]
                assert torch.equal(got, kv[layer][c][t]), (layer, c, t)


def run_two_requests(tmp_path, device="cpu", backend="TRTLLM") -> None:
    prompt = list(range(100, 100 + 150))  # two full 64-token chunks and a tail
    kv = kv_data(len(prompt) + 20, seed=1)
    first = make_executor(tmp_path, device, backend)
    one = first.run_prompt(Request(1, prompt), kv)
    assert (one["matched"], one["loads"], one["stores"]) == (0, 0, 1)
    # On a GPU the store's gather is still in flight when run_prompt returns (the stream, not the host, waits for
    # it), and its chunks become visible when it completes: a request scheduled before that misses them and
    # recomputes. TensorRT-LLM schedules the next context request steps later; the test waits as long explicitly.
    first.worker.engine.flush(timeout=30)
    # Same executor, same prefix, another tail: 128 tokens loaded into other blocks, the rest computed.
    two = first.run_prompt(Request(2, prompt[:128] + list(range(7, 27))), kv[:])
    assert (two["matched"], two["loads"]) == (128, 1)
    assert not set(two["blocks"]) & set(one["blocks"])
    check_loaded(first, two["blocks"], kv, 128)
    first.close()
    # A fresh executor (new pool, new process-equivalent) finds the chunks in the disk tier.
    fresh = make_executor(tmp_path, device, backend)
    three = fresh.run_prompt(Request(3, prompt[:140]), [tuple(torch.zeros_like(x) for x in layer) for layer in kv])
    assert three["matched"] == 128
    check_loaded(fresh, three["blocks"], kv, 128)
    fresh.close()


@pytest.mark.parametrize("backend", ["TRTLLM", "VANILLA"])
def test_hooks_in_executor_order_store_then_load(cache_env, backend: str) -> None:
    run_two_requests(cache_env, backend=backend)


@pytest.mark.parametrize("backend", ["TRTLLM", "VANILLA"])
def test_whole_block_chunks_round_trip_and_are_keyed_apart(cache_env, monkeypatch, backend: str) -> None:
    """$KVPORT_TRTLLM_WHOLE_BLOCKS=1: each pool block (every layer, K and V) is one copy; the same requests store and
    load byte for byte, under a namespace of their own (canonical chunks of the same pool are not read as them)."""
    canonical = make_executor(cache_env, backend=backend)
    canonical_namespace = canonical.worker.engine.namespace
    canonical.close()
    monkeypatch.setenv("KVPORT_TRTLLM_WHOLE_BLOCKS", "1")
    whole = make_executor(cache_env, backend=backend)
    assert whole.worker.engine.descriptor.layout.endswith("+whole-blocks")
    assert whole.worker.engine.namespace != canonical_namespace
    whole.close()
    run_two_requests(cache_env, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("whole_blocks", ["0", "1"])
def test_hooks_in_executor_order_on_gpu(cache_env, monkeypatch, whole_blocks: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    monkeypatch.setenv("KVPORT_TRTLLM_WHOLE_BLOCKS", whole_blocks)
    run_two_requests(cache_env, device="cuda")


def test_nhd_and_hnd_pools_give_the_same_chunks(cache_env) -> None:
    """Keys and canonical chunks do not depend on the attention backend's in-block order."""
    prompt = list(range(64))
    kv = kv_data(65, seed=2)
    hnd = make_executor(cache_env)
    hnd.run_prompt(Request(1, prompt), kv)
    hnd_namespace, fingerprint = hnd.worker.engine.namespace, hnd.worker.engine.descriptor.fingerprint
    hnd.close()
    nhd = make_executor(cache_env, backend="VANILLA")
    # Keys carry the chunk format (a different one would never share them) and every layer, as vLLM's do.
    assert nhd.worker.engine.namespace == hnd_namespace
    fields = json.loads(hnd_namespace)
    assert fields["layout"] == fingerprint and fields["layers"] == f"0-{LAYERS - 1}"
    out = nhd.run_prompt(Request(2, prompt + [1]), [tuple(torch.zeros_like(x) for x in layer) for layer in kv])
    assert out["matched"] == 64
    check_loaded(nhd, out["blocks"], kv, 64)
    nhd.close()


def test_a_short_load_stops_the_step_instead_of_serving_stale_blocks(cache_env) -> None:
    prompt = list(range(200, 330))
    kv = kv_data(len(prompt) + 1, seed=3)
    first = make_executor(cache_env)
    first.run_prompt(Request(1, prompt), kv)
    first.close()
    fresh = make_executor(cache_env)
    request = Request(2, prompt + [5])
    matched, _ = fresh.scheduler.get_num_new_matched_tokens(request, 0)
    assert matched == 128
    fresh.scheduler.update_state_after_alloc(request, [0, 1, 2, 3, 4])
    data = RequestData(2, request.get_tokens(0), [0, 1, 2, 3, 4], 0, len(prompt) + 1 - matched)
    fresh.worker.bind_connector_meta(fresh.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data])))
    for chunk in (cache_env / "l2").rglob("*.kvc"):  # the chunks disappear between the lookup and the load
        chunk.unlink()
    with pytest.raises(RuntimeError, match="could not be loaded"):
        fresh.worker.start_load_kv(None)
    fresh.close()


def test_refusals_are_one_line(cache_env, monkeypatch) -> None:
    def refused(**kw) -> str:
        with pytest.raises(UserError) as err:
            make_executor(cache_env, **kw)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "attention backend CUTEDSL has no kvport layout" in refused(backend="CUTEDSL")
    monkeypatch.setenv("KVPORT_TRTLLM_WHOLE_BLOCKS", "maybe")
    assert "$KVPORT_TRTLLM_WHOLE_BLOCKS: 'maybe' is not a boolean (expected true/false)" in refused()
    monkeypatch.delenv("KVPORT_TRTLLM_WHOLE_BLOCKS")
    monkeypatch.setenv("KVPORT_CHUNK_TOKENS", "48")
    assert "not a multiple" in refused()
    monkeypatch.setenv("KVPORT_CHUNK_TOKENS", "64")
    args = llm_args(cache_env / "model", kv_heads=HEADS, head_dim=HEAD_DIM, tokens_per_block=TPB)
    from kvport.engines.trtllm import WorkerCore

    with pytest.raises(UserError, match="kv_factor 1"):
        WorkerCore(args).register_kv_caches(torch.zeros(4, LAYERS, 1, TPB * 576, dtype=torch.bfloat16))
    with pytest.raises(UserError, match="not tokens_per_block"):
        WorkerCore(args).register_kv_caches(torch.zeros(4, LAYERS, 2, TPB * HEAD_DIM, dtype=torch.bfloat16))
    args.model = str(cache_env / "nowhere")
    with pytest.raises(UserError, match="no config.json"):
        WorkerCore(args).register_kv_caches(torch.zeros(4, LAYERS, 2, TPB * HEADS * HEAD_DIM, dtype=torch.bfloat16))


def test_engine_classes_need_tensorrt_llm() -> None:
    import importlib.util

    import kvport.engines.trtllm as adapter

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here")
    with pytest.raises(ImportError, match="KVPortWorker needs TensorRT-LLM"):
        adapter.KVPortWorker  # noqa: B018
