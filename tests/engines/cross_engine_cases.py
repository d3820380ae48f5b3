"""What the cross-engine tests share: the vLLM/SGLang pairs, the namespace both engines set, and the files that carry
one pair's KV between the CPU half (real vLLM and SGLang code) and the GPU half (kvport's device kernels). No engine
imports here: the GPU device has neither vLLM nor SGLang."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PAGES = 3
SHARED = "shared-model"  # the `namespace` option, set the same on both engines
LAYERS = 3
PAIRS = [
    # (vLLM backend, vLLM layout, SGLang host layout)
    ("FLASH_ATTN", "LBNHC", "layer_first"),
    ("FLASH_ATTN", "BHLNC", "page_first"),
    ("TRITON_ATTN", "LHBNC", "page_head"),
    ("ROCM_ATTN", "LBHNC", "page_first_direct"),
    ("TRITON_MLA", "BLHNC", "page_first"),
    ("FLASHMLA", "LBNHC", "layer_first"),
]
# The files that cross machines: KVPORT_XENGINE_DIR holds what the CPU half recorded (vLLM's allocation and its own
# writes, SGLang's stored pages), KVPORT_XENGINE_OUT what the GPU half stored for SGLang to load.
RECORD_ENV, DEVICE_OUT_ENV = "KVPORT_XENGINE_DIR", "KVPORT_XENGINE_OUT"


def pair_id(backend: str, layout: str, host_layout: str) -> str:
    return f"{backend}-{layout}-{host_layout}"


def tier(path: Path) -> list[dict]:
    return [{"type": "local_disk", "path": str(path), "bytes": "256MiB"}]


def vllm_namespace(fingerprint: str) -> str:
    """The namespace kvport's vLLM worker computes (kvport.engines.vllm_identity.worker_namespace) with the
    ``namespace`` option set: one tensor-parallel shard, one pipeline stage holding every layer."""
    from kvport.engines.key_namespace import layer_span, namespace_for

    return namespace_for("m", None, "bfloat16", 0, 1, SHARED, layout=fingerprint, layers=layer_span(range(LAYERS)))


def vllm_cache(page: int, tier_path: Path, descriptor, backend: str | None = None):
    """A kvport cache configured and bound as kvport's vLLM connector does it for this test: chunk_tokens = vLLM's
    block size (which the SGLang side uses as its page size), SGLang's key scheme, the shared namespace."""
    from kvport.cache import CacheConfig, CacheEngine

    config = CacheConfig(
        chunk_tokens=page,
        key_scheme="sglang",
        l1_bytes=32 << 20,
        tiers=tier(tier_path),
        async_store=False,
        backend=backend,
    )
    cache = CacheEngine(config, vllm_namespace(descriptor.fingerprint))
    cache.bind(descriptor)
    return cache


def views_of(raw: torch.Tensor, views: list[tuple[tuple, tuple, int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """The per-layer tensors vLLM's register_kv_caches received, rebuilt over ``raw`` (the whole allocation as
    bytes) from their recorded (shape, stride, storage offset)."""
    typed = raw.view(dtype)
    return [typed.as_strided(shape, stride, offset) for shape, stride, offset in views]


def view_geometry(tensors: list[torch.Tensor]) -> list[tuple[tuple, tuple, int]]:
    return [(tuple(t.shape), tuple(t.stride()), t.storage_offset()) for t in tensors]


def save_record(where: Path, record: dict[str, Any]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    torch.save(record, where / "record.pt")


def load_record(where: Path) -> dict[str, Any]:
    # Our own file (kvport's AttentionInfo inside), written by the CPU half of this test.
    return torch.load(where / "record.pt", weights_only=False)
