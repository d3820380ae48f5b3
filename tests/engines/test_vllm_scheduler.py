"""The connector's scheduler side driven through vLLM 0.32's real Scheduler (prefix caching on): loads past vLLM's own
hit (at and inside a chunk boundary), a prompt of exactly N cached chunks, and requests that differ from the cached
ones only in their LoRA adapter, cache_salt or prompt embeddings (which must never hit)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm_scheduler import fill_cache, finish, make_scheduler, prompt_tokens, request, schedule, tiny_model  # noqa: E402

from kvport.engines.vllm_identity import request_extra  # noqa: E402

CHUNK = 256


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("sched"))


@pytest.fixture
def extra(tmp_path):
    return {"chunk_tokens": CHUNK, "l1_bytes": "16MiB", "l2_path": str(tmp_path / "l2")}


def _loads(out) -> list[tuple[int, int]]:
    return [(s.num_tokens, s.skip_tokens) for s in out.kv_connector_metadata.loads]


@pytest.mark.parametrize(("head", "vllm_hit"), [(390, 384), (520, 512)])
def test_loads_from_where_vllms_own_hit_ends(model, extra, head, vllm_hit):
    """A request whose first tokens are in vLLM's prefix cache: kvport loads its later chunks from there on (the
    chunk holding vLLM's last cached token only from its next block)."""
    prompt = prompt_tokens(1000, seed=1)
    assert fill_cache(extra, prompt) == 768
    scheduler = make_scheduler(model, extra)
    computed, out = schedule(scheduler, request(prompt[:head]))  # fills vLLM's prefix cache with the head
    finish(scheduler, out)
    computed, out = schedule(scheduler, request(prompt))
    assert computed == 768, "vLLM's own hit plus kvport's chunks up to the last cached chunk"
    assert _loads(out) == [(768, vllm_hit)], "the load starts at vLLM's hit and leaves its blocks alone"
    assert scheduler.connector.stats()["hit_tokens"] >= 768 - vllm_hit


def test_prompt_of_exactly_n_cached_chunks_loads_all_but_its_last_token(model, extra):
    prompt = prompt_tokens(512, seed=2)
    fill_cache(extra, prompt)
    scheduler = make_scheduler(model, extra)
    computed, out = schedule(scheduler, request(prompt))
    assert computed == 511
    assert out.num_scheduled_tokens[out.scheduled_new_reqs[0].req_id] == 1
    assert _loads(out) == [(512, 0)]  # whole chunks; vLLM recomputes the last token into the loaded block


def _hit(model, extra, req) -> int:
    computed, _ = schedule(make_scheduler(model, extra), req)
    return computed


def test_lora_adapter_is_part_of_the_key(model, extra):
    prompt = prompt_tokens(1000, seed=3)
    lora_a = LoRARequest("a", 1, "/adapters/a")
    fill_cache(extra, prompt, request_extra(request(prompt, lora_request=lora_a)))
    assert _hit(model, extra, request(prompt, lora_request=lora_a)) == 768
    assert _hit(model, extra, request(prompt)) == 0, "the base model must not get the adapter's KV"
    assert _hit(model, extra, request(prompt, lora_request=LoRARequest("b", 2, "/adapters/b"))) == 0
    assert _hit(model, extra, request(prompt, lora_request=LoRARequest("a", 1, "/adapters/a-v2"))) == 0
    fill_cache(extra, prompt)
    assert _hit(model, extra, request(prompt, lora_request=lora_a)) == 768
    assert _hit(model, extra, request(prompt)) == 768


def test_cache_salt_isolates_tenants(model, extra):
    prompt = prompt_tokens(1000, seed=4)
    fill_cache(extra, prompt, request_extra(request(prompt, cache_salt="tenant-a")))
    assert _hit(model, extra, request(prompt, cache_salt="tenant-a")) == 768
    assert _hit(model, extra, request(prompt, cache_salt="tenant-b")) == 0
    assert _hit(model, extra, request(prompt)) == 0


def test_prompt_embeddings_are_part_of_the_key(model, extra):
    """Prompt embeddings (token ids are zeros there, as in vLLM): other embeddings of the same length never hit."""
    gen = torch.Generator().manual_seed(5)
    embeds_a = torch.randn(1000, 64, generator=gen).to(torch.bfloat16)
    embeds_b = embeds_a.clone()
    embeds_b[900] += 1  # differs in one row of the last partial chunk: vLLM would still share the first blocks
    req_a = request(None, prompt_embeds=embeds_a)
    fill_cache(extra, [0] * 1000, request_extra(req_a))
    assert _hit(model, extra, request(None, prompt_embeds=embeds_a.clone())) == 768
    assert _hit(model, extra, request(None, prompt_embeds=embeds_b)) == 0
    assert _hit(model, extra, request([0] * 1000)) == 0, "token ids that are the placeholders must not hit"


def test_stats_file_is_replaced_whole_and_dead_writers_temps_are_removed(model, extra, tmp_path):
    import json

    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / ".scheduler.json.999999999.tmp").write_text("{")  # a writer killed mid-write (no such pid)
    extra = {**extra, "stats_dir": str(stats)}
    prompt = prompt_tokens(600, seed=6)
    fill_cache(extra, prompt)
    scheduler = make_scheduler(model, extra)
    schedule(scheduler, request(prompt))
    assert json.loads((stats / "scheduler.json").read_text())["hit_tokens"] == 512
    assert sorted(p.name for p in stats.iterdir()) == ["scheduler.json"]


def test_a_hit_needs_every_pipeline_stage_and_tp_rank(model, extra):
    """Two pipeline stages x two TP ranks report four namespaces; a chunk counts only when all four hold it."""
    from kvport.engines.key_namespace import namespace_for

    shards = {
        (pp, tp): namespace_for(
            "m", None, "bfloat16", tp, 2, pp_rank=pp, pp_world=2, layers=f"{16 * pp}-{16 * pp + 15}"
        )
        for pp in (0, 1)
        for tp in (0, 1)
    }
    prompt = prompt_tokens(1000, seed=7)
    for (pp, tp), namespace in shards.items():
        fill_cache(extra, prompt if (pp, tp) != (1, 1) else prompt[:512], namespace=namespace)
    assert _hit_in(make_scheduler(model, extra, shards=shards), request(prompt)) == 512  # stage 1 rank 1 holds 2
    fill_cache(extra, prompt, namespace=shards[(1, 1)])
    assert _hit_in(make_scheduler(model, extra, shards=shards), request(prompt)) == 768


def _hit_in(scheduler, req) -> int:
    computed, _ = schedule(scheduler, req)
    return computed


def test_a_config_typo_is_refused_where_vllm_asks_first(model, tmp_path):
    from kvport.engines.vllm import KVPortConnector
    from kvport.errors import UserError

    with pytest.raises(UserError, match=r"unknown key 'l2_pth' \(adapter keys: config, layout, namespace, stats_dir"):
        KVPortConnector.requires_piecewise_for_cudagraph({"l2_pth": str(tmp_path)})
    with pytest.raises(UserError, match="unknown key 'l2_pth'"):
        make_scheduler(model, {"l2_pth": str(tmp_path)})
