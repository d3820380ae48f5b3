"""Models with several KV cache groups (full + sliding-window attention) through vLLM 0.32's real Scheduler and the
connector's worker side on vLLM's own allocation: loads run asynchronously, and a chunk that fails between the
scheduler's lookup and the worker's load makes vLLM recompute the request instead of raising."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402
from vllm_scheduler import request  # noqa: E402
from vllm_stack import BLOCK, block_content, build_stack, single_rank, write_request_kv  # noqa: E402

CHUNK, WINDOW = 256, 64
HYBRID = [None, WINDOW, None, WINDOW]  # full attention on even layers, a 64-token window on odd ones
PROMPT = 1000  # 3 whole chunks (768 tokens) and a tail


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from kvport.demo.model import ModelDims, build_model

    dims = ModelDims(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=256, vocab=512, sliding_window=WINDOW)
    return build_model(tmp_path_factory.mktemp("hybrid") / "model", dims)


@pytest.fixture(scope="module", autouse=True)
def ranks():
    with single_rank():
        yield


@pytest.fixture
def extra(tmp_path):
    return {"chunk_tokens": CHUNK, "l1_bytes": "16MiB", "l2_path": str(tmp_path / "l2")}


def _stack(model, extra, windows=HYBRID):
    return build_stack(model, extra, windows, heads=4, kv_heads=2, head_size=64)


def _prompt(seed: int) -> list[int]:
    return torch.randint(10, 500, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


def _store(model, extra, prompt, windows=HYBRID) -> str:
    """An engine computes the prompt (the test writes its KV) and stores its whole chunks; returns its namespace."""
    stack = _stack(model, extra, windows)
    try:
        stack.scheduler.add_request(req := request(prompt, block_size=BLOCK))
        out, _ = stack.step(forward=lambda out: write_request_kv(stack, req.request_id))
        assert out.num_scheduled_tokens[req.request_id] == PROMPT
        assert stack.worker.stats()["connector"]["tokens_stored"] == 768
        return stack.worker.stats()["namespace"]
    finally:
        stack.close()  # drains the disk writes


def _chunk_file(extra, namespace: str, prompt, index: int):
    from kvport.store.keys import chunk_keys
    from kvport.store.tiers.local_disk import LocalDiskTier

    return LocalDiskTier(extra["l2_path"], 1 << 40).path(chunk_keys(prompt, CHUNK, namespace)[index])


def test_vllm_gives_the_hybrid_model_two_groups_and_kvport_loads_it_asynchronously(model, extra) -> None:
    prompt = _prompt(1)
    _store(model, extra, prompt)
    stack = _stack(model, extra)
    try:
        groups = stack.kv_cache_config.kv_cache_groups
        assert [type(g.kv_cache_spec).__name__ for g in groups] == ["FullAttentionSpec", "SlidingWindowSpec"]
        req = request(prompt, block_size=BLOCK)
        stack.scheduler.add_request(req)
        out, kv_out = stack.step()
        # The hit is loaded while vLLM holds the request: nothing of it is scheduled in this step.
        assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS and not out.scheduled_new_reqs
        [load] = out.kv_connector_metadata.loads
        assert (load.load_async, load.num_tokens, load.skip_tokens) == (True, 768, 0)
        assert kv_out.finished_recving == {req.request_id} and not kv_out.failed_recving
        assert not kv_out.invalid_block_ids
        tables = []
        out, _ = stack.step(forward=lambda out: tables.extend(stack.block_ids(req.request_id)))
        [new] = out.scheduled_new_reqs
        assert new.num_computed_tokens == 768 and out.num_scheduled_tokens[req.request_id] == PROMPT - 768
        # Every group's blocks of the 6 loaded token blocks hold what the first engine wrote, except the sliding
        # window's blocks that vLLM already left out (its null block: tokens behind the window).
        null = stack.scheduler.kv_cache_manager.block_pool.null_block.block_id
        for group, ids in zip(groups, tables):
            real = [(pos, block) for pos, block in enumerate(ids[:6]) if block != null]
            assert len(real) == (6 if group is groups[0] else 1)
            for name in group.layer_names:
                view = stack.kv[name]
                for pos, block in real:
                    assert torch.equal(view[block], block_content(name, pos, view[block].shape)), (name, pos)
        assert stack.worker.stats()["connector"]["load_failures"] == 0
    finally:
        stack.close()


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_chunk_lost_between_lookup_and_load_is_recomputed_not_raised(model, extra, damage) -> None:
    prompt = _prompt(2)
    namespace = _store(model, extra, prompt)
    victim = _chunk_file(extra, namespace, prompt, 1)
    assert victim.is_file()

    def spoil(out) -> None:  # after the scheduler's lookup, before the worker's load
        assert out.kv_connector_metadata.loads, "the scheduler must have planned a load"
        if damage == "delete":
            victim.unlink()
        else:
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(bytes(data))

    stack = _stack(model, extra)
    try:
        req = request(prompt, block_size=BLOCK)
        stack.scheduler.add_request(req)
        _, kv_out = stack.step(before_worker=spoil)
        assert kv_out.failed_recving == {req.request_id} and kv_out.finished_recving == {req.request_id}
        assert not kv_out.invalid_block_ids, "block ids are per group: vLLM 0.32 raises on them here"
        # vLLM frees the half-loaded blocks uncached and recomputes the request from its first token; kvport
        # loads nothing more for it, and stores its chunks again.
        out, _ = stack.step(forward=lambda out: write_request_kv(stack, req.request_id))
        [new] = out.scheduled_new_reqs
        assert new.num_computed_tokens == 0 and out.num_scheduled_tokens[req.request_id] == PROMPT
        assert not out.kv_connector_metadata.loads
        assert [(s.num_tokens, s.skip_tokens) for s in out.kv_connector_metadata.stores] == [(768, 0)]
        assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED
        connector = stack.worker.stats()["connector"]
        assert connector["load_failures"] == 1 and connector["tokens_load_failed"] == 512
        assert stack.scheduler.connector.stats()["failed_loads"] == 1
    finally:
        stack.close()
    assert victim.is_file(), "the recomputed chunk was stored again"
    stack = _stack(model, extra)  # and a fresh engine loads all three chunks once more
    try:
        stack.scheduler.add_request(req := request(prompt, block_size=BLOCK))
        _, kv_out = stack.step()
        assert kv_out.finished_recving == {req.request_id} and not kv_out.failed_recving
    finally:
        stack.close()


def test_without_per_request_failures_vllm_raises_on_the_hybrid_model(model, extra, monkeypatch) -> None:
    """The control: the synchronous load's per-block report (what kvport did before) stops vLLM's scheduler."""
    import kvport.engines.vllm as connector

    prompt = _prompt(3)
    namespace = _store(model, extra, prompt)
    victim = _chunk_file(extra, namespace, prompt, 1)
    monkeypatch.setattr(connector, "_load_async", lambda num_groups: False)
    stack = _stack(model, extra)
    try:
        stack.scheduler.add_request(request(prompt, block_size=BLOCK))
        with pytest.raises(RuntimeError, match="not supported for models with multiple KV cache groups"):
            stack.step(before_worker=lambda out: victim.unlink())
    finally:
        stack.close()


def test_one_group_models_keep_the_synchronous_load(model, extra) -> None:
    full = [None] * 4
    prompt = _prompt(4)
    _store(model, extra, prompt, full)
    stack = _stack(model, extra, full)
    try:
        assert len(stack.kv_cache_config.kv_cache_groups) == 1
        stack.scheduler.add_request(req := request(prompt, block_size=BLOCK))
        out, kv_out = stack.step()
        [new] = out.scheduled_new_reqs  # scheduled in the step that loads it
        assert new.num_computed_tokens == 768 and out.num_scheduled_tokens[req.request_id] == PROMPT - 768
        [load] = out.kv_connector_metadata.loads
        assert load.load_async is False and not kv_out.finished_recving
    finally:
        stack.close()
