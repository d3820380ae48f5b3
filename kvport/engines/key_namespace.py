"""The key namespace every engine adapter roots its chunk keys in (kvport.store.keys): one JSON format for vLLM,
SGLang and TensorRT-LLM shards, so the same model, KV dtype, chunk format and shard give the same keys on any engine.
Owns the format only; must not read engine state (each adapter gathers the fields) or import an engine."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# Names the format (not an engine): bump it when the fields' meaning changes, so old namespaces never match new ones.
FORMAT = "kvport-keys-1"


def namespace_for(
    model: str,
    revision: str | None,
    kv_dtype: str = "auto",
    rank: int = 0,
    world: int = 1,
    base: str | None = None,
    *,
    weights: str = "",
    config: str = "",
    layout: str = "",
    pp_rank: int = 0,
    pp_world: int = 1,
    layers: str = "",
) -> str:
    """One shard's key namespace: every field that makes its KV bytes differ, as a JSON object with fixed keys (so no
    two field tuples encode alike). ``model``/``revision`` with ``weights`` (kvport.engines.vllm_identity
    weights_digest) and ``config`` (a digest of the effective model config, dtype and quantization) identify the
    model; ``base`` (the adapter's ``namespace`` option) replaces all four with an operator-chosen name. Then the KV
    dtype, the layout fingerprint (the canonical chunk format), the tensor-parallel rank/size, the pipeline stage and
    the layer indices it holds (``layer_span``)."""
    fields: dict[str, Any] = {"format": FORMAT}
    if base:
        fields["name"] = base
    else:
        fields |= {"model": model, "revision": revision, "weights": weights, "config": config}
    fields |= {"kv_dtype": kv_dtype, "layout": layout, "tp": [rank, world], "pp": [pp_rank, pp_world]}
    fields["layers"] = layers
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def layer_span(indices: Iterable[int]) -> str:
    """The layer indices a stage holds as ranges, e.g. ``0-15`` or ``0-3,8-11``."""
    ordered = sorted(set(indices))
    spans: list[list[int]] = []
    for i in ordered:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
