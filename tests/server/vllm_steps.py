"""Test helper, run as a subprocess: one vLLM engine (vLLM's default multi-process mode unless the request's env says
otherwise) that runs prompts one at a time and waits for / creates marker files between them, so a test can line
up two engines or stop and restart the kvport server between prompts. Writes per-prompt results as JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WAIT_S = 240  # longest wait for a marker file (a second engine starting on 2 cores takes ~30 s)


def main(request_path: str, result_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    from kvport.demo.driver import ENGINE_ENV

    for key, value in {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **request.get("env", {})}.items():
        os.environ[key] = value
    from vllm import LLM, SamplingParams

    from kvport.demo.driver import kvport_transfer_config

    kwargs = {}
    if request.get("kvport") is not None:
        kwargs["kv_transfer_config"] = kvport_transfer_config(request["kvport"])
    started = time.perf_counter()
    llm = LLM(
        request["model"],
        enforce_eager=True,
        enable_prefix_caching=False,  # vLLM's own prefix cache would hide what kvport does
        max_model_len=8192,
        max_num_batched_tokens=request["max_num_batched_tokens"],
        tensor_parallel_size=request.get("tp", 1),
        seed=0,
        **kwargs,
    )
    engine_start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0)
    results = []
    for step in request["steps"]:
        if "touch" in step:
            Path(step["touch"]).touch()
        elif "wait" in step:
            deadline = time.monotonic() + WAIT_S
            while not Path(step["wait"]).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"marker {step['wait']} did not appear in {WAIT_S} s")
                time.sleep(0.05)
        else:
            started = time.perf_counter()
            out = llm.generate([step["prompt"]], params, use_tqdm=False)[0]
            wall = time.perf_counter() - started
            results.append(
                {
                    "prompt_ids": list(out.prompt_token_ids),
                    "prompt_tokens": len(out.prompt_token_ids),
                    "cached_tokens": out.num_cached_tokens or 0,
                    "output_ids": list(out.outputs[0].token_ids),
                    "wall_s": wall,
                }
            )
    llm.llm_engine.engine_core.shutdown()
    stats_dir = (request.get("kvport") or {}).get("stats_dir")
    stats = {}
    if stats_dir and Path(stats_dir).is_dir():
        stats = {p.stem: json.loads(p.read_text()) for p in sorted(Path(stats_dir).glob("*.json"))}
    result = {"engine_start_s": engine_start_s, "results": results, "kvport_stats": stats}
    Path(result_path + ".tmp").write_text(json.dumps(result))
    os.replace(result_path + ".tmp", result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
