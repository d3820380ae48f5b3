"""kvport.layouts.limits: hostile dims are refused at check time in one line, before anything is materialised, and
the byte bound is what allocate() really builds. CLI runs are bounded subprocesses (memory, CPU, wall time)."""

from __future__ import annotations

import pytest

from kvport.layouts import allocate, catalog_names, load_layout
from kvport.layouts.loader import SPECS_DIR
from kvport.layouts.spec import LayoutError

# kvport.layouts.limits' bounds, spelled out so the CLI tests below also run (and fail) on code without that module.
MAX_LAYERS, MAX_TOKENS_PER_BLOCK, MAX_BLOCK_BYTES = 1024, 1 << 16, 1 << 32

FLASH = (SPECS_DIR / "vllm-flash-nhd.yaml").read_text()


def _flash(tmp_path, old: str, new: str):
    assert old in FLASH
    path = tmp_path / "f.yaml"
    path.write_text(FLASH.replace(old, new))
    return path


@pytest.mark.parametrize("name", catalog_names())
def test_block_bytes_bound_is_what_allocate_builds(name):
    from kvport.layouts.limits import group_block_bytes

    spec = load_layout(name)
    kv = allocate(spec, 1, fill="zeros")
    assert sum(s.numel() for s in kv.storages) == sum(group_block_bytes(g) for g in spec.groups)


# (replace in vllm-flash-nhd.yaml, with, the one line of `layout check`)
HOSTILE = {
    "layers-1e9": (
        "layers: 2,",
        "layers: 1000000000,",
        f"groups[0].layers: 1000000000 is over the limit of {MAX_LAYERS} (kvport/layouts/limits.py says why)",
    ),
    "layers-1e8": (
        "layers: 2,",
        "layers: 100000000,",  # passed `check` after 17 s and 3.9 GB; `show` ran past 120 s and 8.6 GB
        f"groups[0].layers: 100000000 is over the limit of {MAX_LAYERS} (kvport/layouts/limits.py says why)",
    ),
    "layers-1e30": (
        "layers: 2,",
        "layers: 1000000000000000000000000000000,",
        "invalid YAML at line 7: integer 1000000000000000000000000000000 does not fit in 64 bits (-2**63 .. 2**63-1)",
    ),
    "layer-range": (
        "layers: $layers",
        "layers: {start: 0, count: 4, step: 1000}",
        f"groups[0].layers: last layer index 3000 is over the limit of {MAX_LAYERS - 1} (see kvport/layouts/limits.py)",
    ),
    "head-dim-1e9": (
        "head_dim: 16,",
        "head_dim: 1000000000,",
        "groups[0]: one block of all its layers is 238.4 GiB, more than the 4 GiB limit",
    ),
    "head-dim-int64-max": (
        "head_dim: 16,",
        "head_dim: 9223372036854775807,",
        "groups[0]: one block of all its layers is over 2**70 bytes, more than the 4 GiB limit",
    ),
    "block-size": (
        "block_size: 16,",
        "block_size: 1000000,",
        f"groups[0].tokens_per_block: 1000000 is more than {MAX_TOKENS_PER_BLOCK} tokens per block",
    ),
    "expression-overflow": (
        "content: {elements: $head_dim}",
        "content: {elements: $head_dim * 1000000000000 * 1000000000000}",
        "groups[0].content.elements: '$head_dim * 1000000000000 * 1000000000000' does not fit in 64 bits",
    ),
    "long-expression": (
        "content: {elements: $head_dim}",
        "content: {elements: $head_dim" + " + 1" * 400 + "}",
        "groups[0].content.elements: expression longer than 200 characters: '$head_dim" + " + 1" * 7 + " + '...",
    ),
}


@pytest.mark.parametrize(("old", "new", "message"), HOSTILE.values(), ids=HOSTILE)
def test_check_and_show_refuse_hostile_dims_in_one_line(tmp_path, bounded_kvport, old, new, message):
    path = _flash(tmp_path, old, new)
    for args in (["layout", "check", str(path)], ["layout", "show", str(path)]):
        run = bounded_kvport(args, memory_bytes=256 << 20, timeout_s=10)
        line = run.one_line_error()
        assert line.removeprefix("kvport layout: ") == f"{path}: {message}"
        assert run.cpu_s < 1.0, run


def test_dims_overrides_are_bounded_and_ascii(bounded_kvport):
    run = bounded_kvport(["layout", "show", "vllm-flash-nhd", "--dims", "layers=1000000000"], memory_bytes=256 << 20)
    assert "groups[0].layers: 1000000000 is over the limit of 1024" in run.one_line_error()
    with pytest.raises(LayoutError, match=r"groups\[0\]\.layers: expected a layer count"):
        load_layout("vllm-flash-nhd", layers="٣")  # an Arabic-Indic 3 is not a number
    run = bounded_kvport(["layout", "show", "vllm-flash-nhd", "--dims", "layers=" + "9" * 5000])
    assert "groups[0].layers: expected a layer count" in run.one_line_error()


def test_limits_admit_the_largest_real_layouts():
    from kvport.layouts import limits
    from kvport.layouts.limits import group_block_bytes

    assert (limits.MAX_LAYERS, limits.MAX_TOKENS_PER_BLOCK, limits.MAX_BLOCK_BYTES) == (
        MAX_LAYERS,
        MAX_TOKENS_PER_BLOCK,
        MAX_BLOCK_BYTES,
    )
    # Llama 3.1 405B with 256-token blocks (126 layers, 8 KV heads of 128, bf16): the largest block we know.
    spec = load_layout("vllm-flash-nhd", layers=126, kv_heads=8, head_dim=128, block_size=256)
    assert sum(group_block_bytes(g) for g in spec.groups) == 132_120_576 < MAX_BLOCK_BYTES
    load_layout("vllm-flash-nhd", layers=MAX_LAYERS)
    load_layout("vllm-flash-nhd", block_size=MAX_TOKENS_PER_BLOCK)


def test_selftest_refuses_a_round_trip_larger_than_available_memory(tmp_path, bounded_kvport):
    from kvport.machine import available_memory

    free = available_memory()
    # head_dim so the estimate (8x the plan: 9 blocks of 48 tokens, plus the chunk) passes what is available.
    per_head_dim = 8 * (9 * 2 * 2 * 16 * 2 * 2 + 48 * 2 * 2 * 2 * 2)
    head_dim = 2 * free // per_head_dim + 1  # twice what is free: other processes free memory while this runs
    if 2 * 2 * 16 * 2 * head_dim * 2 > MAX_BLOCK_BYTES:
        pytest.skip(f"{free} bytes available: no spec within the block limit needs more")
    path = _flash(tmp_path, "head_dim: 16,", f"head_dim: {head_dim},")
    run = bounded_kvport(
        ["selftest", "--layout", str(path), "--backend", "torch", "--no-cross"], memory_bytes=4 << 30, timeout_s=60
    )
    line = run.one_line_error()
    assert line.startswith("kvport selftest: layout vllm-flash-nhd: a round trip needs ") and "available" in line
    assert run.maxrss_bytes < 1 << 30, run  # refused before allocating (torch's import is most of it)
