"""Compiler: a LayoutSpec plus the engine's real tensors -> CopyDescriptor (byte offsets and strides per stream).
Owns binding and validating real tensors against a spec; must not copy data or guess axis order from shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc
from kvport.layouts.spec import GroupSpec, LayoutError, LayoutSpec, format_axes, shape_words

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Handed:
    """One tensor as the engine handed it: which layer position / component it holds (None = all of them)."""

    tensor: torch.Tensor
    layer_pos: int | None
    comp: int | None
    what: str


def split_groups(spec: LayoutSpec, tensors: object) -> list[object]:
    """Per-group engine objects: the object itself for one group, else a sequence or a name -> object mapping."""
    if len(spec.groups) == 1:
        return [tensors]
    if isinstance(tensors, Mapping):
        missing = [g.name for g in spec.groups if g.name not in tensors]
        if missing:
            raise LayoutError(f"{spec.name}: no tensors for group(s) {', '.join(missing)}")
        return [tensors[g.name] for g in spec.groups]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(spec.groups):
        raise LayoutError(f"{spec.name}: expected one entry per group ({len(spec.groups)}) or a mapping by group name")
    return list(tensors)


def handed_tensors(spec: LayoutSpec, gi: int, obj: object) -> list[Handed]:
    """Flatten one group's engine object per its declared structure (never by looking at shapes)."""
    import torch

    g = spec.groups[gi]
    where = f"{spec.name}: groups[{gi}] ({g.name})"
    n = len(g.layers)

    def tensor_list(value: object, label: str) -> list:
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) != n:
            raise LayoutError(f"{where}: {label}: expected a list of {n} per-layer tensors, got {_describe(value)}")
        for li, t in enumerate(value):
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"{where}: {label}[{li}]: expected a tensor, got {type(t).__name__}")
        return list(value)

    if g.structure == "kv_lists":
        if not isinstance(obj, (list, tuple)) or len(obj) != 2 or isinstance(obj[0], torch.Tensor):
            raise LayoutError(f"{where}: expected (k_list, v_list), got {_describe(obj)}")
        return [
            Handed(t, li, ki, f"{g.components[ki]}_list[{li}]")
            for ki in range(2)
            for li, t in enumerate(tensor_list(obj[ki], f"{g.components[ki]}_list"))
        ]
    if g.structure == "shared" and isinstance(obj, torch.Tensor):
        return [Handed(obj, None, None, "shared buffer")]
    return [Handed(t, li, None, f"layer {g.layers[li]}") for li, t in enumerate(tensor_list(obj, "tensors"))]


def _describe(value: object) -> str:
    if hasattr(value, "shape"):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def present_dims(g: GroupSpec, handed: Handed) -> tuple[tuple[str, ...], ...]:
    """The handed tensor's dims in shape order: L is dropped for per-layer tensors, K for per-component ones."""
    drop = ("L" if handed.layer_pos is not None else "") + ("K" if handed.comp is not None else "")
    return tuple(d for d in g.shape_order if not (set(d) & set(drop)))


def conform(t: torch.Tensor, dims: Sequence[tuple[str, ...]], expected: Sequence[int]) -> torch.Tensor | None:
    """``t`` with one tensor dim per spec dim, or None. A merged spec dim (several letters, no B) may be handed as
    several consecutive tensor dims that are dense together: the same bytes, split differently (vLLM hands a ROCm
    K/V region [block_size, heads*head_dim] that the spec reads as one (HDNC) dim). Nothing else is reshaped."""
    if t.dim() == len(dims):
        return t
    shape, strides, at = [], [], 0
    for i, (dim, size) in enumerate(zip(dims, expected)):
        if at >= t.dim():
            return None
        left = len(dims) - i - 1
        if len(dim) == 1 or "B" in dim or t.shape[at] == size or t.dim() - at - 1 == left:
            shape.append(t.shape[at])
            strides.append(t.stride(at))
            at += 1
            continue
        end, total = at, 1
        while end < t.dim() - left and total < size:
            total *= t.shape[end]
            end += 1
        run = range(at, end - 1)
        if total != size or any(t.stride(j) != t.stride(j + 1) * t.shape[j + 1] for j in run):
            return None
        shape.append(size)
        strides.append(t.stride(end - 1))
        at = end
    if at != t.dim():
        return None
    return t.as_strided(shape, strides, t.storage_offset())


def letter_strides(spec: LayoutSpec, gi: int, handed: Handed, component: int = 0) -> tuple[dict[str, int], int]:
    """Validate one handed tensor against the spec; return its per-letter strides in bytes and its block count
    (``component`` matters only for groups whose components store rows in pieces of different widths)."""
    import torch

    g = spec.groups[gi]
    where = f"{spec.name}: groups[{gi}] ({g.name}) {handed.what}"
    want_dtype = getattr(torch, g.dtype)
    if handed.tensor.dtype != want_dtype:
        raise LayoutError(f"{where}: dtype {str(handed.tensor.dtype).removeprefix('torch.')}, the spec says {g.dtype}")
    dims = present_dims(g, handed)
    sizes = g.letter_sizes(1, component)
    expected = g.dim_sizes(dims)
    words = ", ".join(shape_words(dims, expected))
    shape_text = f"shape {tuple(handed.tensor.shape)} does not match {format_axes(dims)} = ({words})"
    t = conform(handed.tensor, dims, expected)
    if t is None:
        raise LayoutError(f"{where}: {shape_text}")
    num_blocks = 0
    for d, (dim, size) in enumerate(zip(dims, expected)):
        if "B" in dim:
            if t.shape[d] % size or t.shape[d] == 0:
                raise LayoutError(f"{where}: {shape_text}")
            num_blocks = t.shape[d] // size
        elif t.shape[d] != size:
            raise LayoutError(f"{where}: {shape_text}")
    sizes["B"] = num_blocks
    strides: dict[str, int] = {}
    for d, dim in enumerate(dims):
        step = t.stride(d) * t.element_size()
        for letter in reversed(dim):
            strides[letter] = step
            step *= sizes[letter]
    if strides["C"] != t.element_size() and sizes["C"] > 1:
        raise LayoutError(f"{where}: rows must be contiguous (C stride {strides['C']} bytes)")
    order = [x for x in g.letters if x in strides and sizes[x] > 1]
    for outer, inner in zip(order, order[1:]):
        if strides[outer] < strides[inner] * sizes[inner]:
            got = ", ".join(f"{x}={strides[x]}" for x in order)
            raise LayoutError(
                f"{where}: byte strides ({got}) are not the spec's memory order {format_axes(g.axes)} (or axes overlap)"
            )
    for letter, nbytes in g.strides_bytes:
        if letter in strides and sizes[letter] > 1 and strides[letter] != nbytes:
            raise LayoutError(f"{where}: {letter} stride is {strides[letter]} bytes, the spec says {nbytes}")
    return strides, num_blocks


def _dense_bytes(g: GroupSpec, strides: dict[str, int], letters: Sequence[str], sizes: dict[str, int]) -> int | None:
    """Byte size of the region spanned by ``letters`` when it is dense in memory order, else None."""
    expect = g.itemsize
    for letter in reversed([x for x in g.letters if x in letters]):
        if sizes[letter] > 1 and strides[letter] != expect:
            return None
        expect *= sizes[letter]
    return expect


def compile_descriptor(spec: LayoutSpec, tensors: object) -> CopyDescriptor:
    """Bind the engine's real tensors (per the spec's structure) into a CopyDescriptor; strides come from them."""
    groups, streams = [], []
    for gi, obj in enumerate(split_groups(spec, tensors)):
        g = spec.groups[gi]
        handed = handed_tensors(spec, gi, obj)
        bound = [(h, *letter_strides(spec, gi, h)) for h in handed]
        counts = {nb for _, _, nb in bound}
        if len(counts) != 1:
            raise LayoutError(f"{spec.name}: groups[{gi}] ({g.name}): tensors disagree on the block count {counts}")
        num_blocks = counts.pop()
        groups.append(GroupDesc(gi, g.name, g.tokens_per_block, g.tokens_per_slot, g.opaque, num_blocks))
        sizes = g.letter_sizes(num_blocks)
        comps = g.canonical_components()
        for li, layer in enumerate(g.layers):
            for ci, comp in enumerate(comps):
                streams.append(_stream(spec, gi, g, bound, li, ci, layer, comp, sizes))
    return CopyDescriptor(spec.name, tuple(groups), tuple(streams), spec.canonical_fingerprint())


def _stream(spec, gi, g: GroupSpec, bound, li, ci, layer, comp, sizes) -> StreamDesc:
    where = f"{spec.name}: groups[{gi}] ({g.name})"
    k_index = ci if "K" in g.letters or g.structure == "kv_lists" else None
    for handed, strides, _ in bound:
        if handed.layer_pos not in (None, li) or handed.comp not in (None, k_index):
            continue
        offset = 0
        if handed.layer_pos is None:
            offset += li * strides["L"]
        if handed.comp is None and k_index is not None and "K" in strides:
            offset += k_index * strides["K"]
        break
    else:  # pragma: no cover - handed_tensors always covers every (layer, component)
        raise AssertionError(f"{where}: no tensor for layer {layer} component {comp.name}")
    if g.opaque:
        row = _dense_bytes(g, strides, g.opaque_row_letters(), sizes)
        if row is None:
            raise LayoutError(f"{where} {handed.what}: opaque block bytes are not contiguous")
        return StreamDesc(gi, layer, comp.name, handed.tensor, offset, strides["B"], row, row, 1, row)
    if g.planes:
        inner = [x for x in g.letters[g.letters.index("B") + 1 :] if x not in "LK"]
        if _dense_bytes(g, strides, inner, sizes) != g.block_bytes():
            raise LayoutError(f"{where} {handed.what}: a block holding planes must be contiguous")
        plane = g.planes[ci]
        offset += g.plane_offsets()[ci]
        return StreamDesc(
            gi,
            layer,
            comp.name,
            handed.tensor,
            offset,
            strides["B"],
            plane.slot_bytes,
            plane.row_bytes,
            plane.heads,
            plane.row_bytes,
        )
    if g.vectors:
        return _pieces_stream(spec, gi, g, handed, li, ci, layer, comp, offset)
    row_stride = strides["H"] if "H" in strides else comp.row_bytes
    return StreamDesc(
        gi, layer, comp.name, handed.tensor, offset, strides["B"], strides["N"], row_stride, comp.rows, comp.row_bytes
    )


def _pieces_stream(spec, gi, g: GroupSpec, handed: Handed, li, ci, layer, comp, offset) -> StreamDesc:
    """A component whose rows are stored as D pieces of ``vector`` elements: each piece is one descriptor row, so a
    slot has heads * D rows; they are addressed with one stride, which needs H to step over exactly D pieces."""
    strides, num_blocks = letter_strides(spec, gi, handed, ci)
    sizes = g.letter_sizes(num_blocks, ci)
    piece = sizes["C"] * g.itemsize
    pieces = sizes["D"]
    step = strides["D"] if pieces > 1 else piece
    if g.heads > 1 and strides["H"] != pieces * step:
        raise LayoutError(
            f"{spec.name}: groups[{gi}] ({g.name}) {handed.what}: component {comp.name}: H stride {strides['H']} bytes"
            f" is not {pieces} pieces of {step} bytes; its row pieces cannot be addressed with one stride"
        )
    if sizes["C"] > 1 and strides["C"] != g.itemsize:
        raise LayoutError(f"{spec.name}: groups[{gi}] ({g.name}) {handed.what}: row pieces must be contiguous")
    return StreamDesc(
        gi, layer, comp.name, handed.tensor, offset, strides["B"], strides["N"], step, g.heads * pieces, piece
    )
