"""Test helper: one fresh real vLLM engine process (kvport.demo.session.run_engine) running a list of prompts, with
kvport's extra config or without kvport, as every end-to-end test here starts them; and EngineRuns, a small model
built once with the engine configurations a test module compares, each run at most once."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

# Three questions after one long shared prefix: the first question stores the prefix, the others load it.
PREFIX_WORDS, QUESTION_WORDS = 700, 20


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


class EngineRuns:
    """A model of ``dims`` (kvport.demo.model.ModelDims) built once under ``root``, three prompts sharing a prefix,
    and the engine configurations run on them, each at most once per test session: ``baseline`` without kvport,
    ``cold`` with kvport and an empty disk tier (``l2``)."""

    def __init__(self, root: Path, dims: dict, chunk_tokens: int, prefix_seed: int, question_seed: int) -> None:
        from kvport.demo.model import ModelDims, build_model, make_text

        self.root = root
        self.chunk_tokens = chunk_tokens
        self.model = str(build_model(root / "model", ModelDims(**dims)))
        prefix = make_text(PREFIX_WORDS, seed=prefix_seed)
        self.prompts = [f"{prefix} {make_text(QUESTION_WORDS, seed=question_seed + q)}" for q in range(3)]
        self.l2 = root / "l2"

    def run(self, name: str, kvport: dict | None, l2: Path | None = None) -> dict:
        """A fresh engine named ``name``: kvport's extra config over the defaults here (``l2_path: None`` drops
        the disk tier), or no kvport for None."""
        if kvport is not None:
            kvport = {"l2_path": str(l2 or self.l2), "l1_bytes": "256MiB", "stats_dir": str(self.root / name), **kvport}
            if kvport["l2_path"] is None:
                del kvport["l2_path"]
        return run_prompts(self.root, name, self.model, self.prompts, kvport, self.chunk_tokens)

    @functools.cached_property
    def baseline(self) -> dict:
        return self.run("baseline", None)

    @functools.cached_property
    def cold(self) -> dict:
        return self.run("cold", {})

    def l2_copy(self, name: str) -> Path:
        """A copy of the disk tier the cold run filled, for a test that damages it."""
        self.cold  # noqa: B018
        dest = self.root / f"l2-{name}"
        shutil.copytree(self.l2, dest)
        return dest
