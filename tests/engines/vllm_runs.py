"""Test helper: one fresh real vLLM engine process (kvport.demo.session.run_engine) running a list of prompts, with
kvport's extra config or without kvport, as every end-to-end test here starts them."""

from __future__ import annotations

from pathlib import Path


def run_prompts(
    root: Path,
    name: str,
    model: str,
    prompts: list[str],
    kvport: dict | None,
    chunk_tokens: int,
    max_tokens: int = 8,
    timeout: float = 300,
    **request: object,
) -> dict:
    """Results of ``prompts`` on a new engine (log ``<root>/work/engine-<name>.log``). A step budget of one chunk
    (``chunk_tokens``) makes vLLM split every prompt at chunk boundaries with or without a hit, so greedy outputs are
    bit-identical (a different split changes float rounding, see kvport.demo.measure)."""
    from kvport.demo.session import run_engine

    body = {
        "model": model,
        "kvport": kvport,
        "prompts": prompts,
        "max_tokens": max_tokens,
        "max_num_batched_tokens": chunk_tokens,
        **request,
    }
    return run_engine(body, root / "work", timeout=timeout, log_name=name)
