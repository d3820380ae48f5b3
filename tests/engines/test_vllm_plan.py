"""Scheduler-side planning of the vLLM connector, without vLLM: hits, caps, loads, stores and rollbacks."""

from __future__ import annotations

import pytest

from kvport.engines.vllm_plan import SchedulerPlan, StepRequest, metrics_port_for

CHUNK, BLOCK = 256, 128


def _plan(cached_tokens: int, first_cached: int = 0, load_async: bool = False) -> SchedulerPlan:
    """A plan over a cache holding chunks [first_cached, cached_tokens) of every prompt (in tokens)."""

    def lookup(tokens, start, extra):
        first = start // CHUNK * CHUNK
        if first < first_cached:
            return first
        return max(first, min(cached_tokens, len(tokens) // CHUNK * CHUNK))

    return SchedulerPlan(lookup, CHUNK, BLOCK, load_async)


def _blocks(n: int) -> list[list[int]]:
    return [list(range(100, 100 + n))]


def test_chunk_must_be_a_multiple_of_the_block_size() -> None:
    with pytest.raises(ValueError, match="multiple of vLLM's block_size"):
        SchedulerPlan(lambda t: 0, 200, 128)


def test_match_leaves_the_last_prompt_token_to_compute() -> None:
    plan = _plan(cached_tokens=10_000)
    assert plan.match("r", list(range(1000)), 0) == 768
    # exactly 4 cached chunks: all but the last token (vLLM must compute one token to sample from)
    assert plan.match("r", list(range(1024)), 0) == 1023
    assert plan.match("r", list(range(1025)), 0) == 1024
    assert plan.match("r", list(range(200)), 0) == 0
    # a resumed request (prompt + generated tokens) may load its whole prompt
    assert plan.match("r", list(range(1024)), 0, num_tokens=1030) == 1024


def test_match_loads_past_vllms_own_hit() -> None:
    plan = _plan(cached_tokens=10_000)
    assert plan.match("r", list(range(1000)), 256) == 512  # vLLM holds chunk 0: chunks 1, 2
    assert plan.match("r", list(range(1000)), 384) == 384  # vLLM's hit ends inside chunk 1: its second half too
    assert plan.match("r", list(range(1000)), 768) == 0  # nothing past vLLM's hit
    assert plan.match("r", list(range(1024)), 512) == 511
    # chunks vLLM holds need not be in kvport (evicted there): the lookup starts at vLLM's hit
    assert _plan(cached_tokens=10_000, first_cached=256).match("r", list(range(1000)), 384) == 384
    assert _plan(cached_tokens=10_000, first_cached=512).match("r", list(range(1000)), 384) == 0


def test_match_is_the_cached_prefix_only() -> None:
    assert _plan(cached_tokens=256).match("r", list(range(1000)), 0) == 256
    assert _plan(cached_tokens=0).match("r", list(range(1000)), 0) == 0


def test_load_after_vllms_hit_skips_its_blocks_and_checks_its_chunks() -> None:
    plan = _plan(cached_tokens=10_000)
    prompt = list(range(1000))
    hit = plan.match("r", prompt, 384)
    plan.after_alloc("r", prompt, hit, b"extra")
    # vLLM reports its own 384 tokens plus our 384 as computed when it first schedules the request
    loads, stores = plan.build([StepRequest("r", 768, 232, _blocks(8))], {})
    assert [(s.num_tokens, s.skip_tokens, s.extra) for s in loads] == [(768, 384, b"extra")]
    # chunk 0 (vLLM's) is not known to kvport: stores cover it (present chunks are skipped by the cache)
    assert [(s.num_tokens, s.skip_tokens, s.extra) for s in stores] == [(768, 0, b"extra")]
    assert plan.hit_tokens == 384


def test_full_prompt_hit_loads_whole_chunks_and_stores_nothing() -> None:
    plan = _plan(cached_tokens=10_000)
    prompt = list(range(1024))
    hit = plan.match("r", prompt, 0)
    plan.after_alloc("r", prompt, hit)
    loads, stores = plan.build([StepRequest("r", 1023, 1, _blocks(8))], {})
    assert [(s.num_tokens, s.skip_tokens) for s in loads] == [(1024, 0)]  # the last token's slot is recomputed
    assert stores == []


def test_load_then_store_only_new_chunks() -> None:
    plan = _plan(cached_tokens=512)
    prompt = list(range(1000))
    hit = plan.match("r", prompt, 0)
    plan.after_alloc("r", prompt, hit)
    loads, stores = plan.build([StepRequest("r", hit, len(prompt) - hit, _blocks(8))], {})
    assert [(s.req_id, s.num_tokens, s.block_ids) for s in loads] == [("r", 512, _blocks(8))]
    assert [(s.num_tokens, s.skip_tokens) for s in stores] == [(768, 512)]
    # Decode steps add no prompt chunks.
    assert plan.build([StepRequest("r", 1000, 1, _blocks(8))], {}) == ([], [])
    assert plan.hit_requests == 1 and plan.hit_tokens == 512 and plan.requests == 1


def test_chunked_prefill_stores_each_chunk_once() -> None:
    plan = _plan(cached_tokens=0)
    prompt = list(range(1100))
    plan.after_alloc("r", prompt, 0)
    got = []
    for before, n in ((0, 300), (300, 300), (600, 500)):
        loads, stores = plan.build([StepRequest("r", before, n, _blocks(9))], {})
        assert loads == []
        got += [(s.num_tokens, s.skip_tokens) for s in stores]
    assert got == [(256, 0), (512, 256), (1024, 512)]


def test_rollback_stores_recomputed_chunks_again() -> None:
    """A failed load (or a preemption) rolls num_computed back; the chunks past it must be stored again."""
    plan = _plan(cached_tokens=768)
    prompt = list(range(1000))
    plan.after_alloc("r", prompt, 768)
    loads, stores = plan.build([StepRequest("r", 768, 232, _blocks(8))], {})
    assert len(loads) == 1 and stores == []
    loads, stores = plan.build([StepRequest("r", 256, 744, _blocks(8))], {})  # vLLM truncated to chunk 1
    assert loads == []
    assert [(s.num_tokens, s.skip_tokens) for s in stores] == [(768, 256)]


def test_requests_seen_only_in_the_scheduler_output_are_tracked() -> None:
    plan = _plan(cached_tokens=0)
    loads, stores = plan.build([StepRequest("x", 0, 600, _blocks(5))], {"x": list(range(600))})
    assert loads == [] and [(s.num_tokens, s.skip_tokens) for s in stores] == [(512, 0)]
    assert plan.build([StepRequest("unknown", 0, 10, _blocks(1))], {}) == ([], [])


def test_finished_forgets_the_request() -> None:
    plan = _plan(cached_tokens=0)
    plan.after_alloc("r", list(range(600)), 0)
    assert plan.tracked() == 1
    plan.finished("r")
    plan.finished("r")  # idempotent: vLLM may report a request finished for all groups too
    assert plan.tracked() == 0


def test_async_load_is_emitted_in_the_allocating_step_with_every_groups_blocks() -> None:
    """Several KV cache groups: vLLM does not schedule the request while it loads, so the load goes out with the
    step that allocated its blocks; when vLLM later schedules it, nothing is loaded again."""
    plan = _plan(cached_tokens=10_000, load_async=True)
    prompt = list(range(1000))
    hit = plan.match("r", prompt, 256)
    assert hit == 512
    groups = [list(range(100, 106)), [0, 0, 0, 0, 0, 205]]  # full attention; a sliding window (null blocks first)
    plan.after_alloc("r", prompt, hit, b"x", groups)
    loads, stores = plan.build([], {})
    assert [(s.req_id, s.num_tokens, s.skip_tokens, s.block_ids, s.load_async) for s in loads] == [
        ("r", 768, 256, groups, True)
    ]
    assert stores == [] and plan.hit_tokens == 512
    assert plan.build([], {}) == ([], [])  # emitted once
    loads, stores = plan.build([StepRequest("r", 768, 232, [groups[0] + [106, 107], groups[1] + [206, 207]])], {})
    assert loads == []
    # as after a synchronous load: chunk 0 (vLLM's) is not known to kvport, the store checks it
    assert [(s.num_tokens, s.skip_tokens) for s in stores] == [(768, 0)]


def test_async_load_without_a_hit_or_with_one_group_is_synchronous() -> None:
    plan = _plan(cached_tokens=10_000, load_async=True)
    plan.after_alloc("r", list(range(100)), 0, b"", None)  # no hit: nothing to load
    assert plan.build([], {}) == ([], [])
    plan = _plan(cached_tokens=10_000)
    prompt = list(range(1000))
    plan.after_alloc("r", prompt, plan.match("r", prompt, 0), b"", [[1, 2, 3, 4, 5, 6]])
    assert plan.build([], {}) == ([], [])
    [load], _ = plan.build([StepRequest("r", 768, 232, _blocks(8))], {})
    assert load.load_async is False


def test_failed_async_load_is_recomputed_without_a_second_load_and_stored_again() -> None:
    plan = _plan(cached_tokens=10_000, load_async=True)
    prompt = list(range(1000))
    plan.after_alloc("r", prompt, plan.match("r", prompt, 0), b"", _blocks(6))
    assert len(plan.build([], {})[0]) == 1
    plan.load_failed(["r", "gone"])  # a request finished meanwhile is ignored
    assert plan.failed_loads == 1
    # vLLM frees the blocks and schedules the request afresh: no hit now, every chunk stored again.
    assert plan.match("r", prompt, 0) == 0
    plan.after_alloc("r", prompt, 0)
    loads, stores = plan.build([StepRequest("r", 0, 1000, _blocks(8))], {})
    assert loads == [] and [(s.num_tokens, s.skip_tokens) for s in stores] == [(768, 0)]


def test_async_allocation_without_a_match_is_an_error() -> None:
    plan = _plan(cached_tokens=10_000, load_async=True)
    with pytest.raises(RuntimeError, match="without a match"):
        plan.after_alloc("r", list(range(1000)), 768, b"", _blocks(6))


def test_each_connector_process_gets_its_own_metrics_port():
    assert metrics_port_for(None, worker=True, rank=3) is None
    ports = [metrics_port_for(9400, worker=False, rank=0)] + [metrics_port_for(9400, True, r) for r in range(4)]
    assert ports == [9400, 9401, 9402, 9403, 9404]
