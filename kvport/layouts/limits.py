"""Numeric limits of a layout spec: the largest layer count, block and per-block bytes a machine can hold, with why.
Owns those bounds and their one-line refusals; must not parse YAML or allocate (it runs before any allocation)."""

from __future__ import annotations

from kvport.layouts.spec import GroupSpec, LayoutSpec

# Layers (count and index). The deepest published LLMs have 126 (Llama 3.1 405B), 118 (PaLM), 96 (GPT-3), 61
# (DeepSeek V3); 1024 is 8x the deepest. Every layer is a tensor the engine registers and a stream in the copy
# tables, and the layer list is materialised while checking, so a file's cost is linear in this bound.
MAX_LAYERS = 1024
# Tokens per block (page). Engines use 1-256 (vLLM 16 by default; TRT-LLM 32-128; SGLang pages 1-64), and vLLM's
# hybrid models raise attention blocks to a few thousand tokens to match a Mamba state page. 65536 is 16x that.
# A block is the smallest unit an engine allocates and a prefix is shared in, so it cannot exceed a request either.
MAX_TOKENS_PER_BLOCK = 1 << 16
# Bytes the engine tensors hold for the tokens of one block of the coarsest group: every group, every layer,
# padding and explicit strides included (what `allocate(spec, 1)` builds; selftest builds ~20x this). The largest
# real one we know is Llama 3.1 405B at 256 tokens/block in bf16: 126 layers * 2 (K, V) * 8 heads * 128 * 2 bytes *
# 256 = 132 MB. 4 GiB is 32x that, still under 2% of the largest accelerator memory (MI355X, 288 GB), and an engine
# needs many blocks (vLLM refuses to start unless one max-length request fits).
MAX_BLOCK_BYTES = 1 << 32


def check_group(group: GroupSpec, fail) -> None:
    """Bounds of one group; ``fail(field_path, message)`` builds the LayoutError. The layer bound is applied while
    parsing (layers are materialised); this checks what the validated group's numbers multiply out to."""
    if group.tokens_per_block > MAX_TOKENS_PER_BLOCK:
        raise fail("tokens_per_block", f"{group.tokens_per_block} is more than {MAX_TOKENS_PER_BLOCK} tokens per block")
    nbytes = group_block_bytes(group)
    if nbytes > MAX_BLOCK_BYTES:
        raise fail(
            "", f"one block of all its layers is {_human(nbytes)}, more than the {_human(MAX_BLOCK_BYTES)} limit"
        )


def check_spec(spec: LayoutSpec, fail) -> None:
    """The tokens of one block of the coarsest group, across all groups, within MAX_BLOCK_BYTES."""
    tokens = max(g.tokens_per_block for g in spec.groups)
    total = sum(-(-tokens // g.tokens_per_block) * group_block_bytes(g) for g in spec.groups)
    if total > MAX_BLOCK_BYTES:
        raise fail(
            "groups",
            f"{tokens} tokens (one block of the coarsest group) take {_human(total)} across groups, "
            f"more than the {_human(MAX_BLOCK_BYTES)} limit",
        )


def group_block_bytes(group: GroupSpec) -> int:
    """Bytes of one block of a group as allocated: all its layers and components, padding and strides included."""
    from kvport.layouts.allocate import physical_strides  # noqa: PLC0415 - allocate imports the compiler

    nbytes = physical_strides(group, 1, group.letters)[1]
    if "L" not in group.letters:  # per_layer and kv_lists: one tensor per layer
        nbytes *= len(group.layers)
    if group.structure == "kv_lists":  # and K, V as separate tensors
        nbytes *= 2
    return nbytes


def _human(nbytes: int) -> str:
    if nbytes >= 1 << 50:  # exact ints of any size: a float would overflow past 1e308
        return f"over 2**{nbytes.bit_length() - 1} bytes"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} bytes"
