"""A hybrid model (full attention on even layers, a sliding window on odd ones: two KV cache groups) on the real vLLM
CPU engine with kvport: outputs identical to a run without kvport, also when a stored chunk is corrupt."""

from __future__ import annotations

import importlib.util

import pytest
from vllm_runs import EngineRuns

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

CHUNK = 256
DIMS = {"layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 512, "sliding_window": 64}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> EngineRuns:
    return EngineRuns(tmp_path_factory.mktemp("vllm-hybrid"), DIMS, CHUNK, prefix_seed=21, question_seed=200)


def _outputs(result: dict) -> list[list[int]]:
    return [r["output_ids"] for r in result["results"]]


def test_hybrid_model_outputs_identical_with_asynchronous_loads(runs: EngineRuns) -> None:
    base, cold = runs.baseline, runs.cold
    assert len({tuple(ids) for ids in _outputs(base)}) > 1, "the test model must answer different prompts differently"
    assert _outputs(cold) == _outputs(base)
    log = (runs.root / "work" / "engine-cold.log").read_text()
    assert "in 2 group(s)" in log, "vLLM must give the hybrid model two KV cache groups"
    hits = [r["cached_tokens"] for r in cold["results"]]
    assert hits[0] == 0 and hits[1] == hits[2] >= 2 * CHUNK, hits
    scheduler, worker = cold["kvport_stats"]["scheduler"], cold["kvport_stats"]["worker0"]
    assert scheduler["load_async"] is True and scheduler["hit_requests"] == 2
    assert worker["connector"]["tokens_loaded"] == sum(hits) and worker["connector"]["load_failures"] == 0


def test_corrupt_chunk_in_a_hybrid_model_is_recomputed_not_a_crash(runs: EngineRuns) -> None:
    from kvport.store.keys import chunk_keys
    from kvport.store.tiers.local_disk import LocalDiskTier

    cold = runs.cold
    l2 = runs.l2_copy("corrupt")
    first = cold["results"][0]
    keys = chunk_keys(first["prompt_ids"], CHUNK, cold["kvport_stats"]["worker0"]["namespace"])
    victim = LocalDiskTier(l2, 1 << 40).path(keys[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    victim.write_bytes(bytes(data))

    result = runs.run("corrupt", {}, l2=l2)
    assert _outputs(result) == _outputs(runs.baseline)
    worker = result["kvport_stats"]["worker0"]["connector"]
    assert worker["load_failures"] == 1 and worker["tokens_load_failed"] > 0
    assert result["kvport_stats"]["scheduler"]["failed_loads"] == 1
    # The cold run stored every prompt's whole chunks, and the recomputed request stored its own again: the other
    # prompts load all their whole chunks (leaving the last prompt token to compute).
    assert [r["cached_tokens"] for r in result["results"][1:]] == [
        (r["prompt_tokens"] - 1) // CHUNK * CHUNK for r in result["results"][1:]
    ]
