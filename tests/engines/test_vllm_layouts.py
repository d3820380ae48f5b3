"""vLLM backend/layout -> kvport layout mapping and layer ordering, without vLLM, plus descriptor binding of
vLLM-shaped CPU_ATTN tensors (per-layer views into one shared buffer) through the real layout catalog."""

from __future__ import annotations

import pytest

from kvport.engines.vllm_layouts import (
    LEGACY_LAYOUTS,
    STANDARDIZED_LAYOUTS,
    AttentionInfo,
    catalog_layout,
    layer_order,
    load_for,
    normalize_layout,
    tensors_in_order,
)
from kvport.errors import UserError


def _info(backend: str, layout: str | None, layers: int = 2, standardized: bool = True, **kw) -> AttentionInfo:
    names = tuple(f"model.layers.{i}.self_attn.attn" for i in range(layers))
    dims = {"block_size": 128, "num_kv_heads": 2, "head_size": 32, "dtype": "bfloat16"} | kw
    return AttentionInfo(backend=backend, layout=layout, standardized=standardized, layer_names=names, **dims)


@pytest.mark.parametrize(
    "backend,layout,standardized,expected",
    [
        ("CPU_ATTN", "LBHNC", True, "vllm-cpu-attn"),
        ("FLASH_ATTN", "LBNHC", True, "vllm-std-lbnhc"),
        ("FLASH_ATTN", "KVCacheLayout.LBHNC", True, "vllm-std-lbhnc"),
        ("FLASHINFER", "BLHNC", True, "vllm-std-blhnc"),
        ("TRITON_ATTN", "NHD", True, "vllm-std-lbnhc"),
        ("FLASH_ATTN", "NHD", False, "vllm-flash-nhd"),
        ("FLASH_ATTN", "HND", False, "vllm-flash-hnd"),
        ("FLASHINFER", "HND", False, "vllm-flashinfer-hnd"),
        ("FLASH_ATTN", "BHLNC", True, "vllm-std-bhlnc"),
        ("ROCM_AITER_FA", "LHBNC", True, "vllm-std-lhbnc"),
        ("FLASHMLA", None, False, "vllm-mla"),
    ],
)
def test_declared_backend_and_layout_pick_the_layout(backend, layout, standardized, expected) -> None:
    assert catalog_layout(_info(backend, layout, standardized=standardized)) == expected


@pytest.mark.parametrize(
    "layout,expected",
    [("LBNHC", "vllm-std-mla"), ("LHBNC", "vllm-std-mla"), ("BLHNC", "vllm-std-mla-block-outer")],
)
def test_mla_pages_pick_the_4d_view_spec(layout: str, expected: str) -> None:
    info = _info("TRITON_MLA", layout, kind="mla", num_kv_heads=1, head_size=576)
    assert catalog_layout(info) == expected


def test_packing_comes_from_the_spec_fields_not_from_sizes() -> None:
    """ROCm's K/V head slots with 2 KV heads have exactly the sizes of K|V-packed pages; only the spec's declared
    num_head_slots / state_content_bytes tell them apart."""
    planes = dict(head_slots=2, content_bytes=2 * 32 * 2)
    assert catalog_layout(_info("ROCM_ATTN", "LBHNC", **planes)) == "vllm-rocm-split-lbhnc"
    assert catalog_layout(_info("B12X", "BLHNC", **planes)) == "vllm-kvplanes-blhnc"
    with pytest.raises(UserError, match="ROCM_ATTN with KV cache layout LBHNC: .*kv_packed pages"):
        catalog_layout(_info("ROCM_ATTN", "LBHNC"))
    with pytest.raises(UserError, match="FLASH_ATTN with KV cache layout LBHNC: .*kv_planes pages"):
        catalog_layout(_info("FLASH_ATTN", "LBHNC", **planes))


@pytest.mark.parametrize(
    "fields,why",
    [
        ({"quant": "FP8_PER_TOKEN_HEAD"}, "quantization FP8_PER_TOKEN_HEAD"),
        ({"padded_page": True}, "padded pages"),
        ({"tokens_per_state": 4}, "4 tokens per stored state"),
        (
            {"head_size_v": 16},
            "attention pages with num_head_slots=None, state_content_bytes=None, head_size=32, head_size_v=16",
        ),
    ],
)
def test_pages_kvport_does_not_describe_are_refused_in_one_line(fields, why) -> None:
    with pytest.raises(UserError, match=why) as err:
        catalog_layout(_info("FLASH_ATTN", "LBNHC", **fields))
    assert "\n" not in str(err.value)


def test_unknown_backend_is_a_one_line_user_error() -> None:
    with pytest.raises(UserError, match="NEW_BACKEND with KV cache layout LBNHC: kvport has no verified layout") as err:
        catalog_layout(_info("NEW_BACKEND", "NHD"))
    assert "\n" not in str(err.value)


def test_override_wins() -> None:
    assert catalog_layout(_info("NEW_BACKEND", "NHD"), override="vllm-flash-nhd") == "vllm-flash-nhd"


def test_legacy_names() -> None:
    assert normalize_layout("NHD") == "LBNHC" and normalize_layout("hnd") == "LBHNC" and normalize_layout(None) is None


def test_mapped_layouts_in_the_catalog_load_with_vllm_dims() -> None:
    from kvport.layouts import catalog_names

    names = set(catalog_names())
    standardized = [(b, o, name, packing) for (b, packing, o), name in STANDARDIZED_LAYOUTS.items()]
    legacy = [(b, o, name, None) for (b, o), name in LEGACY_LAYOUTS.items()]
    for backend, layout, name, packing in standardized + legacy:
        assert name in names, f"{backend}/{layout} maps to {name}, which is not in the layout catalog"
        fields = {"kind": "mla"} if packing == "mla" else {}
        if packing == "kv_planes":
            fields = {"head_slots": 2, "content_bytes": 2 * 64 * 2}
        layout = None if layout == "*" else layout
        info = _info(backend, layout, layers=3, standardized=packing is not None, head_size=64, **fields)
        dims = dict(load_for(info).dims)
        assert dims["layers"] == 3, (name, dims)
        if "head_dim" in dims and "kv_heads" in dims:
            assert (dims["head_dim"], dims["kv_heads"]) == (64, 2), (name, dims)


def test_layer_order_is_numeric_not_lexical() -> None:
    names = [f"model.layers.{i}.self_attn.attn" for i in (10, 2, 0, 1)]
    assert layer_order(names) == [f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 10)]
    with pytest.raises(UserError, match="no layer index"):
        layer_order(["lm_head"])
    with pytest.raises(UserError, match="no tensor for layer"):
        tensors_in_order({}, ["model.layers.0.attn"])


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


# vLLM 0.32 KVCacheLayout values: the logical [L, B, H, N, C] axes in physical (memory) order.
_VLLM_ORDERS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4)}


def _vllm_views(logical, order: str) -> list:
    """What vLLM 0.32's allocate_kv_cache hands a connector: one buffer in ``order``, per layer a [B, H, N, C] view."""
    perm = _VLLM_ORDERS[order]
    physical = logical.permute(*perm).contiguous()
    inverse = sorted(range(5), key=perm.__getitem__)
    view = physical.permute(*inverse)
    return [view[layer] for layer in range(logical.shape[0])]


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_gpu_standardized_layouts_give_one_canonical_chunk(backend: str) -> None:
    """The same logical KV stored in every vLLM 0.32 physical order gathers to the same canonical bytes, and
    scatters back into another order at the right blocks only (layout/transfer level; no GPU engine here)."""
    import torch

    from kvport.hal.backends.torch_ref import TorchBackend
    from kvport.layouts import compile_descriptor

    layers, blocks, heads, block, head = 3, 6, 2, 16, 32
    logical = torch.randn(layers, blocks, heads, block, 2 * head).to(torch.bfloat16)
    backend_ops = TorchBackend()
    chunks = {}
    for order in _VLLM_ORDERS:
        info = _info(backend, order, layers=layers, block_size=block, num_kv_heads=heads, head_size=head)
        views = _vllm_views(logical, order)
        handed = dict(zip(info.layer_names, views))
        desc = compile_descriptor(load_for(info), tensors_in_order(handed, info.layer_names))
        chunk = torch.empty(desc.canonical_bytes(2 * block), dtype=torch.uint8)
        backend_ops.gather(desc, [4, 1], chunk, 2 * block)
        chunks[order] = chunk
    first = chunks["LBNHC"]
    assert all(torch.equal(first, c) for c in chunks.values())

    target = torch.zeros_like(logical)
    info = _info(backend, "BLHNC", layers=layers, block_size=block, num_kv_heads=heads, head_size=head)
    views = _vllm_views(target, "BLHNC")  # a copy in BLHNC order; scatter writes into it, read back below
    desc = compile_descriptor(load_for(info), views)
    backend_ops.scatter(first, desc, [0, 5], 2 * block)
    got = torch.stack(views)
    assert torch.equal(got[:, 0], logical[:, 4]) and torch.equal(got[:, 5], logical[:, 1])
    assert not got[:, 1:5].any()
