"""Token-level views of engine tensors built from shape semantics (axis letters, torch views), not from descriptors.
Owns the independent oracle that selftest and tests check compiled descriptors against; must not use StreamDesc."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.layouts.compiler import Handed, conform, handed_tensors, present_dims, split_groups
from kvport.layouts.spec import GroupSpec, LayoutSpec

if TYPE_CHECKING:
    import torch


def _letter_view(g: GroupSpec, handed: Handed, component: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The handed tensor as uint8 with one dim per axis letter (C in bytes), and those letters in shape order."""
    import torch

    dims = present_dims(g, handed)
    t = conform(handed.tensor, dims, g.dim_sizes(dims, 1))
    t = t.view(torch.uint8)  # C is innermost and contiguous, so this only widens the last dim
    num_blocks = None
    sizes = g.letter_sizes(1, component)
    sizes["C"] *= g.itemsize
    for d, dim in enumerate(dims):
        if "B" in dim:
            other = 1
            for letter in dim:
                other *= 1 if letter == "B" else sizes[letter]
            num_blocks = t.shape[d] // other
    sizes["B"] = num_blocks
    for d in reversed(range(len(dims))):
        t = t.unflatten(d, [sizes[x] for x in dims[d]])
    return t, [x for dim in dims for x in dim]


def slot_rows(spec: LayoutSpec, tensors: object) -> dict[tuple[int, int, str], torch.Tensor]:
    """(group, layer, component) -> uint8 view [blocks, slots_per_block, rows, pieces, piece_bytes] of engine memory
    (one piece per row unless the group stores rows in D pieces)."""
    out = {}
    for gi, obj in enumerate(split_groups(spec, tensors)):
        g = spec.groups[gi]
        comps = g.canonical_components()
        for handed in handed_tensors(spec, gi, obj):
            for li, layer in enumerate(g.layers):
                if handed.layer_pos not in (None, li):
                    continue
                for ci, comp in enumerate(comps):
                    view, letters = _letter_view(g, handed, ci if g.vectors else 0)
                    k_index = ci if "K" in g.letters or g.structure == "kv_lists" else None
                    if handed.comp not in (None, k_index):
                        continue
                    v, lets = view, list(letters)
                    if "L" in lets:
                        v = v.select(lets.index("L"), li)
                        lets.remove("L")
                    if "K" in lets and (k_index is not None and (not g.opaque or g.k_outside_block())):
                        v = v.select(lets.index("K"), k_index)
                        lets.remove("K")
                    out[(gi, layer, comp.name)] = _rows(g, v, lets, ci)
    return out


def _rows(g: GroupSpec, v: torch.Tensor, lets: list[str], ci: int) -> torch.Tensor:
    nb = v.shape[lets.index("B")]
    if g.opaque or g.planes:
        # Whole block, dims in memory order, flattened: a view only if the block really is contiguous.
        inner = [x for x in g.letters if x in lets and x != "B"]
        block = v.permute([lets.index("B")] + [lets.index(x) for x in inner]).view(nb, -1)
        if g.opaque:
            return block.view(nb, 1, 1, 1, -1)
        plane = g.planes[ci]
        start = g.plane_offsets()[ci]
        size = g.slots_per_block * plane.slot_bytes
        return block[:, start : start + size].view(nb, g.slots_per_block, plane.heads, 1, plane.row_bytes)
    for letter in "HD":
        if letter not in lets:
            v = v.unsqueeze(-1)
            lets = lets + [letter]
    v = v.permute([lets.index(x) for x in "BNHDC"])
    if g.vectors:
        return v  # [B, N, H, D, piece bytes]: the D pieces of a row, back to back, are the canonical row
    return v[..., : g.content_elems * g.itemsize]


def _slot_index(g: GroupSpec, ids: Sequence[int], num_tokens: int) -> tuple[list[int], list[int]]:
    if g.opaque:
        count, spb = -(-num_tokens // g.tokens_per_block), 1
    else:
        count, spb = -(-num_tokens // g.tokens_per_slot), g.slots_per_block
    return [int(ids[s // spb]) for s in range(count)], [s % spb for s in range(count)]


def _tables(spec: LayoutSpec, block_ids) -> list:
    if len(spec.groups) == 1 and (len(block_ids) == 0 or not isinstance(block_ids[0], (list, tuple))):
        return [list(block_ids)]
    return [list(t) for t in block_ids]


def canonical_from_tokens(spec: LayoutSpec, tensors: object, block_ids, num_tokens: int) -> torch.Tensor:
    """The canonical chunk for ``num_tokens`` tokens, assembled from token views (the descriptor-free oracle)."""
    import torch

    rows = slot_rows(spec, tensors)
    tables = _tables(spec, block_ids)
    parts = []
    for gi, g in enumerate(spec.groups):
        blocks, slots = _slot_index(g, tables[gi], num_tokens)
        for layer in g.layers:
            for comp in g.canonical_components():
                view = rows[(gi, layer, comp.name)]
                parts.append(view[torch.tensor(blocks), torch.tensor(slots)].cpu().reshape(-1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def write_tokens(spec: LayoutSpec, tensors: object, block_ids, num_tokens: int, chunk: torch.Tensor) -> None:
    """Write a canonical chunk into engine tensors through token views (the descriptor-free scatter oracle)."""
    import torch

    rows = slot_rows(spec, tensors)
    tables = _tables(spec, block_ids)
    at = 0
    for gi, g in enumerate(spec.groups):
        blocks, slots = _slot_index(g, tables[gi], num_tokens)
        for layer in g.layers:
            for comp in g.canonical_components():
                view = rows[(gi, layer, comp.name)]
                n = len(blocks) * comp.rows * comp.row_bytes
                part = chunk[at : at + n].view(len(blocks), *view.shape[2:]).to(view.device)
                view[torch.tensor(blocks, device=view.device), torch.tensor(slots, device=view.device)] = part
                at += n
