"""Real vLLM CPU engines (one fresh process per run) on a shared disk tier: rebuilt weights at the same path are a
miss (identical weights hit again), loads continue past vLLM's own prefix-cache hit, and kvport's INFO lines reach
vLLM's log."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from vllm_runs import run_prompts

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

CHUNK, BLOCK = 256, 128  # vLLM's CPU attention uses 128-token blocks
DIMS = {"layers": 2, "hidden": 128, "heads": 2, "kv_heads": 2, "intermediate": 256, "vocab": 512}


class Cluster:
    def __init__(self, root: Path) -> None:
        from kvport.demo.model import make_text

        self.root = root
        self.model = root / "model"
        self.build(seed=0)
        self.prompts = [make_text(900, seed=21), make_text(900, seed=22)]

    def build(self, seed: int) -> None:
        from kvport.demo.model import ModelDims, build_model

        build_model(self.model, ModelDims(**DIMS, seed=seed))

    def run(self, name: str, prompts, l2: str, kvport: bool = True, prefix_caching: bool = False) -> dict:
        extra = {"l2_path": str(self.root / l2), "l1_bytes": "64MiB", "stats_dir": str(self.root / name)}
        kv = extra if kvport else None
        return run_prompts(
            self.root, name, str(self.model), prompts, kv, CHUNK, max_tokens=6, enable_prefix_caching=prefix_caching
        )

    def log(self, name: str) -> str:
        return (self.root / "work" / f"engine-{name}.log").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    return Cluster(tmp_path_factory.mktemp("vllm-keys"))


def _cached(result: dict) -> list[int]:
    return [r["cached_tokens"] for r in result["results"]]


def test_rebuilt_weights_at_the_same_path_miss(cluster: Cluster) -> None:
    from kvport.store.tiers.local_disk import LocalDiskTier

    cold = cluster.run("weights-a", cluster.prompts, "l2-weights")
    assert _cached(cold) == [0, 0]
    again = cluster.run("weights-a-again", cluster.prompts, "l2-weights")
    assert all(c >= 3 * CHUNK for c in _cached(again)), "same weights, fresh process: every whole chunk hits"
    cluster.build(seed=1)  # other weights, same path, same shapes
    try:
        other = cluster.run("weights-b", cluster.prompts, "l2-weights")
    finally:
        cluster.build(seed=0)
    assert _cached(other) == [0, 0], "KV of the old weights must never be served to the new ones"
    ns_a = cold["kvport_stats"]["worker0"]["namespace"]
    ns_b = other["kvport_stats"]["worker0"]["namespace"]
    assert ns_a != ns_b
    listed = {u.name: u.chunks for u in LocalDiskTier(cluster.root / "l2-weights", 1 << 40).namespaces()}
    assert listed[ns_a] >= 6 and listed[ns_b] >= 6
    # identical weights rebuilt (new files, new mtimes, same bytes): the content digest matches, hits again
    back = cluster.run("weights-a-rebuilt", cluster.prompts, "l2-weights")
    assert back["kvport_stats"]["worker0"]["namespace"] == ns_a
    assert all(c >= 3 * CHUNK for c in _cached(back))
    log = cluster.log("weights-a")
    assert "kvport: bound 2 layers" in log and f"namespace {ns_a}" in log
    assert "kvport: scheduler looks up 1 shard namespace(s)" in log


def test_loads_continue_past_vllms_own_prefix_cache_hit(cluster: Cluster) -> None:
    """Prefix caching ON: the head of a prompt is in vLLM's cache (a shorter prompt ran first), its tail chunks only
    in kvport's disk tier: kvport loads from where vLLM's hit ends, inside a chunk (vLLM's hit is 3 blocks of 128)."""
    fill = cluster.run("pc-fill", cluster.prompts[:1], "l2-prefix")
    prompt = fill["results"][0]["prompt_ids"]
    assert len(prompt) > 3 * CHUNK
    head = prompt[:400]  # vLLM caches 3 full blocks of it: 384 tokens, inside chunk 1
    both = cluster.run("pc-both", [head, prompt], "l2-prefix", prefix_caching=True)
    assert _cached(both) == [CHUNK, 3 * CHUNK]
    worker = both["kvport_stats"]["worker0"]["connector"]
    assert worker["load_failures"] == 0
    assert worker["tokens_loaded"] == CHUNK + (3 * CHUNK - 3 * BLOCK), "the second load skips vLLM's 3 blocks"
    # The same prompt loaded wholly from kvport gives the same output: the partial load put the right KV in the
    # right blocks (and left vLLM's own alone).
    whole = cluster.run("pc-whole", [prompt], "l2-prefix", prefix_caching=True)
    assert _cached(whole) == [3 * CHUNK]
    assert both["results"][1]["output_ids"] == whole["results"][0]["output_ids"]
