"""Allocation of engine-shaped KV tensors for a spec (tests, selftest, benchmarks): exactly as the engine holds them.
Owns building tensors with the spec's memory order, padding and structure; must not copy KV or know engines."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.layouts.compiler import compile_descriptor
from kvport.layouts.descriptor import CopyDescriptor
from kvport.layouts.spec import GroupSpec, LayoutError, LayoutSpec

if TYPE_CHECKING:
    import torch

FILLS = ("random", "zeros")


@dataclasses.dataclass(frozen=True)
class EngineKV:
    """Engine-shaped KV tensors (``tensors``: per the spec's structure; a list per group when several groups)
    and the descriptor compiled from them. ``storages`` are the flat uint8 buffers behind them, for byte checks."""

    spec: LayoutSpec
    tensors: object
    descriptor: CopyDescriptor
    storages: tuple[torch.Tensor, ...]
    num_blocks: tuple[int, ...]


def physical_strides(g: GroupSpec, num_blocks: int, letters: Sequence[str]) -> tuple[dict[str, int], int]:
    """Byte strides of ``letters`` (memory order, dense except the spec's explicit strides) and the total size."""
    sizes = g.letter_sizes(num_blocks)
    explicit = dict(g.strides_bytes)
    strides, extent = {}, g.itemsize
    for letter in reversed([x for x in g.letters if x in letters]):
        strides[letter] = explicit.get(letter, extent)
        extent = strides[letter] * sizes[letter]
    return strides, extent


def _one_tensor(g: GroupSpec, num_blocks: int, drop: str, *, fill: str, device, generator) -> torch.Tensor:
    import torch

    letters = [x for x in g.letters if x not in drop]
    strides, nbytes = physical_strides(g, num_blocks, letters)
    item = g.itemsize
    nbytes = -(-nbytes // item) * item
    if fill == "random":
        # Random bytes (not random floats): every byte pattern, so an unwritten byte is caught with p = 255/256.
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    else:
        raw = torch.zeros(nbytes, dtype=torch.uint8)
    raw = raw.to(device)
    flat = raw.view(getattr(torch, g.dtype))
    mem_dims = [d for d in g.axes if not set(d) & set(drop)]
    shape_dims = [d for d in g.shape_order if not set(d) & set(drop)]
    assert sorted(mem_dims) == sorted(shape_dims)
    elem_strides = [strides[dim[-1]] // item for dim in shape_dims]
    return flat.as_strided(g.dim_sizes(shape_dims, num_blocks), elem_strides, 0)


def allocate(
    spec: LayoutSpec,
    num_blocks: int | Sequence[int],
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    fill: str = "random",
) -> EngineKV:
    """Engine-shaped tensors for ``num_blocks`` blocks per group (an int, or one per group), compiled."""
    import torch

    if fill not in FILLS:
        raise LayoutError(f"allocate: fill {fill!r} is not one of {', '.join(FILLS)}")
    counts = [num_blocks] * len(spec.groups) if isinstance(num_blocks, int) else list(num_blocks)
    if len(counts) != len(spec.groups) or any(type(c) is not int or c <= 0 for c in counts):
        raise LayoutError(f"allocate: num_blocks must be a positive int or one per group, got {num_blocks!r}")
    per_group = []
    for g, count in zip(spec.groups, counts):
        make = functools.partial(_one_tensor, g, count, fill=fill, device=device, generator=generator)
        n = len(g.layers)
        if g.structure == "per_layer":
            per_group.append([make("L") for _ in range(n)])
        elif g.structure == "kv_lists":
            per_group.append(tuple([make("LK") for _ in range(n)] for _ in range(2)))
        else:
            buffer = make("")
            if g.hands == "layers":
                l_dim = g.shape_order.index(("L",))
                per_group.append([buffer.select(l_dim, li) for li in range(n)])
            else:
                per_group.append(buffer)
    tensors = per_group[0] if len(spec.groups) == 1 else per_group
    storages: dict[int, torch.Tensor] = {}
    for t in _leaves(per_group):
        raw = torch.empty(0, dtype=torch.uint8, device=t.device)
        raw.set_(t.untyped_storage())
        storages.setdefault(t.untyped_storage().data_ptr(), raw)
    return EngineKV(spec, tensors, compile_descriptor(spec, tensors), tuple(storages.values()), tuple(counts))


def _leaves(obj: object) -> list:
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    return [obj]
