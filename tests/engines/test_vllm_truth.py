"""kvport's vLLM layouts proven against vLLM 0.32's own code: for every attention backend whose class imports on the
CPU build and every KV cache layout vLLM can choose for it, KV is allocated by allocate_kv_cache (fed by
get_kv_cache_config_from_groups), written by the backend's do_kv_cache_update, gathered by kvport and compared element
by element with the tokens written, then scattered into fresh blocks and compared with the engine's own write there."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import zlib  # noqa: E402

import torch  # noqa: E402
from vllm_truth import Case, build, build_hybrid, expected_chunk, make_tokens, registered_name, write  # noqa: E402

from kvport.engines.vllm_layouts import ORDERS, info_from_spec, load_for, tensors_in_order  # noqa: E402
from kvport.errors import UserError  # noqa: E402
from kvport.hal.backends.torch_ref import TorchBackend  # noqa: E402
from kvport.layouts import compile_descriptor, load_layout  # noqa: E402

# Every backend class that imports on vLLM 0.32's CPU build (FlashInfer's with the flashinfer-python package), except
# the DeepSeek V4 / MiniMax / sparse backends, which need their model's own spec types (refused below by kind).
BACKENDS = (
    "FLASH_ATTN",
    "TRITON_ATTN",
    "FLASHINFER",
    "FLEX_ATTENTION",
    "TRITON_FLASH_ATTN",
    "TRITON_FLASHINFER",
    "ROCM_ATTN",
    "ROCM_SEGMENTED_ATTN",
    "ROCM_AITER_FA",
    "ROCM_AITER_UNIFIED_ATTN",
    "B12X",
    "CPU_ATTN",
    "FLASH_ATTN_DIFFKV",
    "TRITON_ATTN_DIFFKV",
    "TURBOQUANT",
    "FLASHMLA",
    "TRITON_MLA",
    "FLASHINFER_MLA",
    "CPU_MLA",
    "AMX_MLA",
    "TOKENSPEED_MLA",
    "ROCM_AITER_MLA",
)
# Pairs whose write vLLM's own code cannot run on this build (none now: the pairs where it cannot are refused first).
VLLM_FAILS: dict[tuple[str, str], str] = {}
_BLOCK_OUTER = ("BLNHC", "BLHNC", "BHLNC")
# Pairs kvport refuses at start with one line (docs/vllm.md says why for each).
REFUSED: set[tuple[str, str]] = {
    # CPU_MLA's write raises (kv_cache.view(-1, 576) of a block-outer view); AMX_MLA's kernel writes bytes the view it
    # hands connectors does not describe (found by this test: ~60-97% of gathered bytes differed).
    *((b, o) for b in ("CPU_MLA", "AMX_MLA") for o in _BLOCK_OUTER),
    # Not proven: other formats (different K/V head sizes, TurboQuant codes, FP8-only MLA with its own row format).
    *((b, o) for b in ("FLASH_ATTN_DIFFKV", "TRITON_ATTN_DIFFKV", "TOKENSPEED_MLA") for o in ORDERS),
    ("TURBOQUANT", "LBNHC"),
}


def _layouts(backend: str) -> list[str]:
    """The layouts vLLM may resolve for this backend: its declared set, or all six when it declares none."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    declared = AttentionBackendEnum[backend].get_class().supported_kv_cache_layouts()
    return [layout.name for layout in declared] if declared else list(ORDERS)


CASES = [(b, layout) for b in BACKENDS for layout in _layouts(b)]


def _refusal(case: Case, engine) -> str | None:
    info = info_from_spec(registered_name(engine.backend_cls), engine.spec, case.layout, engine.names)
    try:
        load_for(info)
    except UserError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("backend,layout", CASES)
def test_gather_and_scatter_match_vllm(backend: str, layout: str) -> None:
    check(Case(backend, layout))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("layout", ["LBHNC", "LHBNC"])
def test_rocm_split_pages_with_other_head_counts(heads: int, layout: str) -> None:
    """ROCm's K/V head slots coincide in shape with K|V-packed pages only at 2 heads; 1 and 4 must bind too."""
    assert check(Case("ROCM_ATTN", layout, kv_heads=heads)) == f"vllm-rocm-split-{layout.lower()}"


# kv_cache_dtype=fp8 (per-tensor scale, kept on the layer): vLLM's CPU build accepts "auto", "fp8", "fp8_e4m3" and
# "fp8_e5m2" for CPU_ATTN (cpu_attn.py supported_kv_cache_dtypes) and only "auto" for CPU_MLA / AMX_MLA.
@pytest.mark.parametrize(
    "backend,layout,dtype",
    [
        ("FLASH_ATTN", "LBNHC", "fp8"),
        ("FLASH_ATTN", "BHLNC", "fp8_e4m3"),
        ("TRITON_ATTN", "LHBNC", "fp8"),
        ("ROCM_ATTN", "LBHNC", "fp8"),
        ("CPU_ATTN", "LBHNC", "fp8"),
        ("CPU_ATTN", "LBHNC", "fp8_e5m2"),
        ("TRITON_MLA", "BLHNC", "fp8"),
    ],
)
def test_fp8_pages(backend: str, layout: str, dtype: str) -> None:
    assert check(Case(backend, layout, cache_dtype=dtype)) != "refused"


def test_rocm_aiter_fa_is_named_by_its_class_and_its_shuffle_pages_are_refused(monkeypatch) -> None:
    """ROCM_AITER_FA reports get_name() == "FLASH_ATTN"; the adapter names it by class. In shuffle mode its pages are
    K/V head slots re-tiled in place by the shuffle kernels, which kvport does not describe: refused in one line."""
    from vllm._aiter_ops import rocm_aiter_ops
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.utils import customize_attention_spec

    cls = AttentionBackendEnum.ROCM_AITER_FA.get_class()
    assert cls.get_name() == "FLASH_ATTN" and registered_name(cls) == "ROCM_AITER_FA"
    monkeypatch.setattr(rocm_aiter_ops, "is_shuffle_kv_cache_enabled", classmethod(lambda cls: True))
    base = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    spec = customize_attention_spec(cls, base)
    assert spec.num_head_slots == 2  # the shuffle packing, as vLLM's own customize_spec publishes it
    names = ["model.layers.0.self_attn.attn"]
    with pytest.raises(UserError, match="ROCM_AITER_FA with KV cache layout LHBNC: kvport has no verified") as err:
        load_for(info_from_spec(registered_name(cls), spec, "LHBNC", names))
    assert "\n" not in str(err.value)


def check(case: Case) -> str:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.backend}/{case.layout}".encode()))
    key = (case.backend, case.layout)
    engine = build(case)
    refusal = _refusal(case, engine)
    if key in REFUSED:
        assert refusal is not None and "\n" not in refusal, refusal
        return "refused"
    assert refusal is None, refusal
    tokens = make_tokens(engine, gen)
    try:
        write(engine, tokens)
    except Exception as exc:  # noqa: BLE001 - vLLM's own code refusing this pair is the finding
        assert key in VLLM_FAILS, f"vLLM's own write failed: {type(exc).__name__}: {exc}"
        assert VLLM_FAILS[key] in f"{type(exc).__name__}: {exc}"
        return "vllm-fails"
    assert key not in VLLM_FAILS, "vLLM's own code now runs this pair: kvport must be checked against it"
    info = info_from_spec(registered_name(engine.backend_cls), engine.spec, case.layout, engine.names)
    spec = load_for(info)
    descriptor = compile_descriptor(spec, tensors_in_order(engine.kv, engine.names))
    ops = TorchBackend()
    chunk = torch.empty(descriptor.canonical_bytes(tokens.count), dtype=torch.uint8)
    ops.gather(descriptor, tokens.block_ids, chunk, tokens.count)
    if not spec.opaque:
        want = expected_chunk(engine, tokens)
        wrong = int((chunk != want).sum())
        assert wrong == 0, f"{spec.name}: {wrong} of {want.numel()} gathered bytes differ from the tokens written"
    # Scatter into fresh blocks of a fresh cache and compare with vLLM writing the same tokens there itself.
    new_ids = [(b + 3) % 8 for b in tokens.block_ids]
    mine, theirs = build(case), build(case)
    target = compile_descriptor(spec, tensors_in_order(mine.kv, mine.names))
    ops.scatter(chunk, target, new_ids, tokens.count)
    tokens.block_ids = new_ids
    write(theirs, tokens)
    differ = int((mine.raw() != theirs.raw()).sum())
    assert differ == 0, f"{spec.name}: scatter left {differ} bytes unlike vLLM's own write of the same tokens"
    return spec.name


def test_a_wrong_spec_is_caught_by_the_truth_check() -> None:
    """The check has teeth: ROCm's K/V head-slot pages bound as K|V-packed pages (what kvport did before; shapes
    coincide at 2 KV heads) gather wrong bytes, as issue 14 found."""
    engine = build(Case("ROCM_ATTN", "LBHNC"))
    tokens = make_tokens(engine, torch.Generator().manual_seed(5))
    write(engine, tokens)
    dims = {"layers": 3, "kv_heads": 2, "head_dim": 64, "block_size": engine.block_size, "dtype": "bfloat16"}
    wrong_spec = load_layout("vllm-std-lbhnc", **dims)
    descriptor = compile_descriptor(wrong_spec, tensors_in_order(engine.kv, engine.names))
    chunk = torch.empty(descriptor.canonical_bytes(tokens.count), dtype=torch.uint8)
    TorchBackend().gather(descriptor, tokens.block_ids, chunk, tokens.count)
    assert int((chunk != expected_chunk(engine, tokens)).sum()) > chunk.numel() // 2


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_hybrid_groups_bind_from_vllms_groups(layout: str) -> None:
    """A hybrid model (full attention on even layers, sliding window on odd ones): vLLM's kv_cache_config has two
    groups over one allocation, each with its own block table; kvport binds both without a hand-set layout."""
    from kvport.engines.vllm_layouts import spec_for

    h = build_hybrid(layout, seed=7)
    cls = h.engine.backend_cls
    infos = [info_from_spec(registered_name(cls), g.kv_cache_spec, layout, g.layer_names) for g in h.groups]
    spec = spec_for(infos)
    assert [g.layers for g in spec.groups] == [(0, 2), (1, 3)]
    descriptor = compile_descriptor(spec, [tensors_in_order(h.kv, n) for n in h.names])
    count = h.written[0].count
    chunk = torch.empty(descriptor.canonical_bytes(count), dtype=torch.uint8)
    TorchBackend().gather(descriptor, h.tables, chunk, count)
    want = torch.cat([expected_chunk(h.engine, tokens) for tokens in h.written])
    assert torch.equal(chunk, want)
