"""Hypothesis property tests: random dims, block tables and partial chunks round-trip through the torch reference
gather/scatter, match the descriptor-free token oracle, leave other bytes untouched, and move across layouts."""

from __future__ import annotations

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvport.hal.backends.torch_ref import TorchBackend
from kvport.layouts import allocate, load_layout
from kvport.layouts.roundtrip import Plan, gather_checked, scatter_checked

# The MHA family: every one of these must give byte-identical canonical chunks for the same dims.
MHA = [
    "vllm-flash-nhd",
    "vllm-triton-nhd",
    "vllm-flash-hnd",
    "vllm-flashinfer-nhd",
    "vllm-flashinfer-hnd",
    "vllm-packed-nhd",
    "vllm-packed-hnd",
    "vllm-cross-layer",
    "vllm-std-lbnhc",
    "vllm-std-lbhnc",
    "vllm-std-blnhc",
    "vllm-std-blhnc",
    "sglang-mha",
    "sglang-host-layer-first",
    "sglang-host-page-first",
    "sglang-host-page-first-direct",
    "trtllm-pool",
]
BACKEND = TorchBackend()
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def model_dims(draw):
    return {
        "layers": draw(st.integers(1, 3)),
        "kv_heads": draw(st.integers(1, 3)),
        "head_dim": draw(st.sampled_from([1, 2, 3, 8])),
        "dtype": draw(st.sampled_from(["bfloat16", "float32", "uint8"])),
    }


def _spec(name, dims, block):
    key = "page_size" if name.startswith("sglang") else "block_size"
    return load_layout(name, **dims, **{key: block})


@st.composite
def plans(draw, spec, num_tokens=None):
    if num_tokens is None:
        biggest = max(g.tokens_per_block for g in spec.groups)
        num_tokens = draw(st.integers(1, 4 * biggest))
    counts, tables = [], []
    for g in spec.groups:
        need = -(-num_tokens // g.tokens_per_block)
        total = need + draw(st.integers(0, 3))
        counts.append(total)
        tables.append(tuple(draw(st.permutations(range(total)))[:need]))
    return Plan(num_tokens, tuple(counts), tuple(tables))


def _round_trip(spec, data):
    plan = data.draw(plans(spec))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    source = allocate(spec, list(plan.num_blocks), generator=gen)
    chunk, problem = gather_checked(spec, source, plan, BACKEND, "cpu")
    assert problem == ""
    assert chunk.numel() == source.descriptor.canonical_bytes(plan.num_tokens)
    target_plan = data.draw(plans(spec, plan.num_tokens))
    assert scatter_checked(spec, chunk, target_plan, BACKEND, "cpu", gen) == ""


@FAST
@given(
    name=st.sampled_from(MHA + ["vllm-mla", "sglang-mla", "hybrid-swa"]),
    dims=model_dims(),
    block=st.sampled_from([1, 2, 3, 5, 16]),
    data=st.data(),
)
def test_round_trip_random_dims_tables_and_partial_chunks(name, dims, block, data):
    if name == "vllm-mla":
        dims = {"layers": dims["layers"], "dtype": dims["dtype"], "head_dim": dims["head_dim"] + 2}
    if name == "sglang-mla":
        dims = {"layers": dims["layers"], "dtype": dims["dtype"], "kv_lora_rank": dims["head_dim"], "rope_dim": 2}
    if name == "hybrid-swa":
        dims = {k: v for k, v in dims.items() if k != "layers"} | {"full_layers": 2, "swa_layers": dims["layers"]}
    _round_trip(_spec(name, dims, block), data)


@FAST
@given(
    a=st.sampled_from(MHA),
    b=st.sampled_from(MHA),
    dims=model_dims(),
    blocks=st.tuples(st.sampled_from([1, 4, 16]), st.sampled_from([2, 3, 16])),
    data=st.data(),
)
def test_cross_layout_transfer_keeps_token_values(a, b, dims, blocks, data):
    spec_a, spec_b = _spec(a, dims, blocks[0]), _spec(b, dims, blocks[1])
    assert spec_a.canonical_fingerprint() == spec_b.canonical_fingerprint()
    plan_a = data.draw(plans(spec_a))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    source = allocate(spec_a, list(plan_a.num_blocks), generator=gen)
    chunk, problem = gather_checked(spec_a, source, plan_a, BACKEND, "cpu")
    assert problem == ""
    # scatter_checked compares B's engine bytes with A's token values written through B's token views.
    assert scatter_checked(spec_b, chunk, data.draw(plans(spec_b, plan_a.num_tokens)), BACKEND, "cpu", gen) == ""


@st.composite
def synthetic_specs(draw):
    """A one-family-file-only model: compressed slots, padded rows, optional explicit block stride, planes."""
    tps = draw(st.sampled_from([1, 2, 4]))
    tpb = tps * draw(st.integers(1, 4))
    content = draw(st.integers(1, 5))
    pad = draw(st.integers(0, 3))
    heads = draw(st.integers(1, 2))
    latent = {
        "name": "latent",
        "kind": "mla",
        "layers": draw(st.integers(1, 2)),
        "tokens_per_block": tpb,
        "tokens_per_slot": tps,
        "structure": "per_layer",
        "axes": draw(st.sampled_from(["BNHC", "BHNC"])),
        "heads": heads,
        "dtype": "float16",
        "content": {"elements": content},
        "padded_content": {"elements": content + pad},
    }
    block_bytes = (tpb // tps) * heads * (content + pad) * 2
    if draw(st.booleans()):
        latent["strides"] = {"B": {"bytes": block_bytes + 2 * draw(st.integers(0, 8))}}
    slots = draw(st.integers(1, 3))
    planes = {
        "name": "indexer",
        "kind": "indexer",
        "layers": 1,
        "tokens_per_block": tps * slots,
        "tokens_per_slot": tps,
        "structure": "per_layer",
        "axes": "BNC",
        "dtype": "uint8",
        "content": {"bytes": 8 + 4},
        "planes": [
            {"name": "value", "dtype": "float8_e4m3fn", "content": {"elements": 8}},
            {"name": "scale", "dtype": "float32", "content": {"elements": 1}},
        ],
    }
    return {"name": "synthetic", "source": "hypothesis", "groups": [latent, planes]}


@FAST
@given(doc=synthetic_specs(), data=st.data())
def test_yaml_only_families_round_trip(tmp_path_factory, doc, data):
    path = tmp_path_factory.mktemp("spec") / "synthetic.yaml"
    path.write_text(yaml.safe_dump(doc))
    _round_trip(load_layout(str(path)), data)


@FAST
@given(dims=model_dims(), data=st.data())
def test_opaque_blocks_round_trip(dims, data):
    _round_trip(load_layout("vllm-cpu-attn", **dims, block_size=data.draw(st.sampled_from([1, 4, 16]))), data)
