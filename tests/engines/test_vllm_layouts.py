"""vLLM backend/layout -> kvport layout mapping and layer ordering, without vLLM, plus descriptor binding of
vLLM-shaped CPU_ATTN tensors (per-layer views into one shared buffer) through the real layout catalog."""

from __future__ import annotations

import pytest

from kvport.engines.vllm_layouts import (
    BACKEND_LAYOUTS,
    AttentionInfo,
    catalog_layout,
    layer_order,
    load_for,
    namespace_for,
    normalize_layout,
    tensors_in_order,
)
from kvport.errors import UserError


def _info(backend: str, layout: str | None, layers: int = 2, **kw) -> AttentionInfo:
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(layers))
    dims = {"block_size": 128, "num_kv_heads": 2, "head_size": 32, "dtype": "bfloat16"} | kw
    return AttentionInfo(backend=backend, layout=layout, layer_names=names, **dims)


@pytest.mark.parametrize(
    "backend,layout,expected",
    [
        ("CPU_ATTN", "LBHNC", "vllm-cpu-attn"),
        ("FLASH_ATTN", "NHD", "vllm-flash-nhd"),
        ("FLASH_ATTN", "LBNHC", "vllm-flash-nhd"),
        ("FLASH_ATTN", "HND", "vllm-flash-hnd"),
        ("FLASH_ATTN", "KVCacheLayout.LBHNC", "vllm-flash-hnd"),
        ("FLASHMLA", None, "vllm-mla"),
    ],
)
def test_declared_backend_and_layout_pick_the_layout(backend: str, layout: str, expected: str) -> None:
    assert catalog_layout(_info(backend, layout)) == expected


def test_unknown_backend_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError, match="NEW_BACKEND with KV cache layout LBNHC has no kvport layout") as err:
        catalog_layout(_info("NEW_BACKEND", "NHD"))
    assert "\n" not in str(err.value)


def test_override_wins() -> None:
    assert catalog_layout(_info("NEW_BACKEND", "NHD"), override="vllm-flash-nhd") == "vllm-flash-nhd"


def test_legacy_names() -> None:
    assert normalize_layout("NHD") == "LBNHC" and normalize_layout("hnd") == "LBHNC" and normalize_layout(None) is None


def test_mapped_layouts_in_the_catalog_load_with_vllm_dims() -> None:
    from kvport.layouts import catalog_names

    names = set(catalog_names())
    for (backend, layout), name in BACKEND_LAYOUTS.items():
        if name not in names or layout == "*":
            continue
        spec = load_for(_info(backend, layout, layers=3, head_size=64))
        dims = dict(spec.dims)
        assert dims.get("layers", 3) == 3 and dims.get("head_dim", 64) == 64, (name, dims)
    assert {"vllm-cpu-attn", "vllm-flash-nhd", "vllm-flash-hnd"} <= names


def test_layer_order_is_numeric_not_lexical() -> None:
    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 0, 1)]
    assert layer_order(names) == [f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 10)]
    with pytest.raises(UserError, match="no layer index"):
        layer_order(["lm_head"])
    with pytest.raises(UserError, match="no tensor for layer"):
        tensors_in_order({}, ["model.layers.0.attn"])


def test_namespace_separates_models_dtypes_and_shards() -> None:
    a = namespace_for("m", None, "bfloat16", 0, 1)
    assert len({a, namespace_for("m2", None, "bfloat16", 0, 1), namespace_for("m", None, "float16", 0, 1)}) == 3
    assert namespace_for("m", None, "bfloat16", 1, 2) != namespace_for("m", None, "bfloat16", 0, 2)
    assert namespace_for("m", None, "bfloat16", 0, 1, base="shared").startswith("shared|")


def test_cpu_attn_views_round_trip_whole_blocks() -> None:
    """vLLM CPU hands per-layer views [blocks, kv_heads, block, 2*head] into one buffer; kvport must copy whole
    blocks of every layer and leave other blocks untouched."""
    import torch

    from kvport.hal.backends.torch_ref import TorchBackend
    from kvport.layouts import compile_descriptor

    info = _info("CPU_ATTN", "LBHNC", layers=3)
    spec = load_for(info)
    buf = torch.randn(3, 8, 2, 128, 64).to(torch.bfloat16)
    # vLLM's dict order need not be layer order: insert the layers backwards.
    views = {name: buf[i] for i, name in reversed(list(enumerate(info.layer_names)))}
    desc = compile_descriptor(spec, tensors_in_order(views, info.layer_names))
    backend = TorchBackend()
    chunk = torch.empty(desc.canonical_bytes(256), dtype=torch.uint8)
    backend.gather(desc, [5, 2], chunk, 256)
    assert chunk.numel() == 3 * 2 * buf[0, 0].numel() * 2  # 3 layers x 2 whole blocks of bf16
    target = torch.zeros_like(buf)
    tdesc = compile_descriptor(spec, [target[i] for i in range(3)])
    backend.scatter(chunk, tdesc, [1, 7], 256)
    assert torch.equal(target[:, 1], buf[:, 5]) and torch.equal(target[:, 7], buf[:, 2])
    untouched = [b for b in range(8) if b not in (1, 7)]
    assert not target[:, untouched].any()
