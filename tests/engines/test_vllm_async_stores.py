"""Asynchronous stores through vLLM 0.32's real Scheduler and block pool: a finished request that stored keeps its
blocks until the workers report its stores done, and a preempted request's stores are fenced before vLLM hands its
blocks to other tokens."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm_scheduler import finish, make_scheduler, prompt_tokens, request, tiny_model  # noqa: E402

CHUNK = 256


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("async"))


def _extra(tmp_path, **more):
    return {"chunk_tokens": CHUNK, "l1_bytes": "16MiB", "l2_path": str(tmp_path / "l2"), **more}


def _free(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def test_finished_request_keeps_its_blocks_until_its_stores_are_reported(model, tmp_path) -> None:
    scheduler = make_scheduler(model, _extra(tmp_path), num_blocks=100)
    free_before = _free(scheduler)
    req = request(prompt_tokens(600, seed=1))
    scheduler.add_request(req)
    out = scheduler.schedule()
    assert [(s.num_tokens, s.skip_tokens) for s in out.kv_connector_metadata.stores] == [(512, 0)]
    finish(scheduler, out)  # max_tokens=1: the request finishes in its first step
    assert req.request_id in scheduler.requests, "vLLM must keep the blocks the store may still read"
    assert _free(scheduler) < free_before
    nxt = scheduler.schedule()
    assert req.request_id in nxt.finished_req_ids  # what the workers' get_transfer_results receives
    finish(scheduler, nxt, KVConnectorOutput(finished_sending={req.request_id}))
    assert req.request_id not in scheduler.requests and _free(scheduler) == free_before
    stats = scheduler.connector.stats()
    assert stats["delayed_frees"] == 1 and stats["async_stores"] is True


def test_a_request_that_stored_nothing_frees_at_once(model, tmp_path) -> None:
    scheduler = make_scheduler(model, _extra(tmp_path), num_blocks=100)
    req = request(prompt_tokens(200, seed=2))  # under one chunk: no store
    scheduler.add_request(req)
    out = scheduler.schedule()
    assert out.kv_connector_metadata.stores == []
    finish(scheduler, out)
    assert req.request_id not in scheduler.requests


def test_synchronous_stores_never_delay(model, tmp_path) -> None:
    scheduler = make_scheduler(model, _extra(tmp_path, async_stores=False), num_blocks=100)
    req = request(prompt_tokens(600, seed=3))
    scheduler.add_request(req)
    out = scheduler.schedule()
    assert len(out.kv_connector_metadata.stores) == 1
    finish(scheduler, out)
    assert req.request_id not in scheduler.requests and scheduler.connector.stats()["delayed_frees"] == 0


def _decode(scheduler, out) -> None:
    """One step: a token for every request past its prompt (none of them finishes: max_tokens is large)."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    runner = ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[
            [7] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_prompt_tokens else []
            for r in ids
        ],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
    )
    scheduler.update_from_output(out, runner)


def test_preemption_fences_the_stores_of_the_preempted_request(model, tmp_path) -> None:
    """Two requests fill the block pool; when one needs a block for its next token, vLLM preempts the other and hands
    its blocks out in the same step: that step's metadata must fence the preempted request's in-flight stores."""
    blocks_per_req = 304 // 16  # 300-token prompts: 19 blocks of 16, full after 4 decoded tokens
    scheduler = make_scheduler(model, _extra(tmp_path), num_blocks=2 * blocks_per_req + 2)  # + the null block
    reqs = [request(prompt_tokens(300, seed=10 + i), max_tokens=64) for i in range(2)]
    for req in reqs:
        scheduler.add_request(req)
    out = scheduler.schedule()
    assert sorted(s.req_id for s in out.kv_connector_metadata.stores) == sorted(r.request_id for r in reqs)
    fences, preempted = [], set()
    for _ in range(16):  # bounded: preemption comes within a few decode steps
        _decode(scheduler, out)
        out = scheduler.schedule()
        fences += out.kv_connector_metadata.fences
        preempted |= set(out.preempted_req_ids or ())
        if preempted:
            break
    assert preempted, "the pool was sized for a preemption within 16 steps"
    assert sorted(fences) == sorted(preempted)
    assert scheduler.connector.stats()["fenced_requests"] == len(preempted)
