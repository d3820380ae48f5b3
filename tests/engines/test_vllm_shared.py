"""Two machines, one cache: two real vLLM (CPU) engines that share nothing but a Redis server (and, separately, a
Mooncake Store), each with its own L1 and its own disk tier. A prompt the first engine computed is loaded by the
second, vLLM reports the cached tokens, and the outputs equal those of an engine without kvport."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
from vllm_runs import run_prompts

from kvport.testing.servers import MooncakeServer, RedisServer, find_binary

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.servers,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

CHUNK = 256
DIMS = {"layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256, "vocab": 512}
# Engines on this 2-core machine share it with other work: a generous bound keeps a slow reply from being a miss here
# (the bound itself is tested in tests/store).
TIER_OPTIONS = "timeout=5"


class Engines:
    def __init__(self, root: Path) -> None:
        from kvport.demo.model import ModelDims, build_model, make_text

        self.root = root
        self.model = str(build_model(root / "model", ModelDims(**DIMS)))
        self.prompts = [make_text(700, seed=21), make_text(500, seed=22)]

    def run(self, name: str, kvport: dict | None) -> dict:
        if kvport is not None:
            kvport = {"l1_bytes": "128MiB", "stats_dir": str(self.root / name), **kvport}
        return run_prompts(self.root, name, self.model, self.prompts, kvport, CHUNK, timeout=400)

    @functools.cached_property
    def baseline(self) -> dict:
        return self.run("baseline", None)

    def pair(self, kind: str, url: str) -> tuple[dict, dict]:
        """Engine A computes and stores; engine B, with an empty L1 and its own empty disk, loads from the server."""
        tier = f"{url}{'&' if '?' in url else '?'}{TIER_OPTIONS}"
        first = self.run(f"{kind}-a", {"l2_path": str(self.root / f"{kind}-disk-a"), "tiers": [tier]})
        second = self.run(f"{kind}-b", {"l2_path": str(self.root / f"{kind}-disk-b"), "tiers": [tier]})
        return first, second


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Engines:
    return Engines(tmp_path_factory.mktemp("vllm-shared"))


def _outputs(result: dict) -> list[list[int]]:
    return [r["output_ids"] for r in result["results"]]


def _check_shared(engines: Engines, first: dict, second: dict, tier: str) -> None:
    assert _outputs(first) == _outputs(engines.baseline)
    assert _outputs(second) == _outputs(engines.baseline)
    assert [r["cached_tokens"] for r in first["results"]] == [0, 0]  # nothing to share yet
    for r in second["results"]:
        expected = (r["prompt_tokens"] - 1) // CHUNK * CHUNK
        assert expected >= CHUNK and r["cached_tokens"] == expected, "vLLM must report the shared chunks as cached"
    cache = second["kvport_stats"]["worker0"]["cache"]
    loaded = sum(r["cached_tokens"] for r in second["results"])
    assert cache["tokens_loaded"] == loaded
    assert cache[f"hits_load_{tier}"] == loaded // CHUNK  # every chunk came from the server, none from its disk
    assert cache.get("hits_load_local_disk", 0) == 0
    assert second["kvport_stats"]["worker0"]["connector"]["load_failures"] == 0


@pytest.mark.skipif(
    find_binary("redis-server") is None or importlib.util.find_spec("redis") is None, reason="no redis-server/client"
)
def test_second_engine_loads_what_the_first_stored_through_redis(engines: Engines) -> None:
    with RedisServer(engines.root / "redis") as srv:
        first, second = engines.pair("redis", srv.url)
        assert srv.client().dbsize() > 0
    _check_shared(engines, first, second, "redis")


@pytest.mark.skipif(
    find_binary("mooncake_master") is None or importlib.util.find_spec("mooncake") is None, reason="no Mooncake"
)
def test_second_engine_loads_what_the_first_stored_through_mooncake(engines: Engines) -> None:
    with MooncakeServer(engines.root / "mooncake") as srv:
        first, second = engines.pair("mooncake", srv.url)
    _check_shared(engines, first, second, "mooncake")
