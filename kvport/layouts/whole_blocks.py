"""Whole-block chunks: a descriptor whose every group moves each engine block, all its layers, as one row.
Owns the check that a group's block is one contiguous run it alone owns, and that format's fingerprint; must not copy.

Why: the canonical chunk is layer-major, so a transfer is one region per (layer, component, block) at best (32 KiB
for Llama-3-8B NHD, 18 KiB MLA, 256-byte rows HND); the copy engines keep up with the link only from ~32 KiB regions
(kvport.hal.transfer.planner), and SM kernels wait for SMs the engine's kernels hold. When the engine lays its blocks
out block-outer (vLLM 0.32's BLNHC, BLHNC, BHLNC: one block holds every layer's K and V), a block of all layers is
one run of engine memory (2 MiB for Llama-3-8B at 16 tokens per block): a chunk of 256 tokens is 16 regions. The
price: the chunk holds the engine's in-block bytes, so only the same layout (same in-block order, same layer
positions) reads it; the fingerprint says exactly that, and other layouts miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc
from kvport.layouts.spec import LayoutError

SUFFIX = "+whole-blocks"


def whole_blocks(descriptor: CopyDescriptor) -> CopyDescriptor:
    """The same engine memory as ``descriptor``, each group's block copied as one row of all its layers. Raises a
    one-line LayoutError when a group's block is not exactly one contiguous run of its own streams' bytes (a
    layer-outer layout, or padding between layers)."""
    if descriptor.layout.endswith(SUFFIX):
        return descriptor
    groups: list[GroupDesc] = []
    streams: list[StreamDesc] = []
    placement = []
    for group in descriptor.groups:
        members = [s for s in descriptor.streams if s.group == group.index]
        stride = _block_run(descriptor, group, members)
        anchor = min(members, key=lambda s: s.base_ptr)
        lo = anchor.base_ptr
        groups.append(dataclasses.replace(group, tokens_per_slot=1, opaque=True))
        row = (stride, stride, stride, 1, stride)  # block, slot and row strides; one row of the whole block
        streams.append(StreamDesc(group.index, anchor.layer, "block", anchor.buffer, anchor.offset, *row))
        placement.append(
            {
                "group": group.name,
                "tokens_per_block": group.tokens_per_block,
                "block_bytes": stride,
                # Where each (layer, component) sits inside the block: two processes must agree on it to share chunks.
                "streams": [
                    [s.layer, s.component, s.base_ptr - lo, s.slot_stride, s.row_stride, s.rows_per_slot, s.row_bytes]
                    for s in members
                ],
            }
        )
    blob = json.dumps(
        {"canonical": descriptor.fingerprint, "layout": descriptor.layout, "whole_blocks": placement},
        sort_keys=True,
        separators=(",", ":"),
    )
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:32]
    return CopyDescriptor(descriptor.layout + SUFFIX, tuple(groups), tuple(streams), fingerprint)


def _block_run(descriptor: CopyDescriptor, group: GroupDesc, members: list[StreamDesc]) -> int:
    """The block stride, after checking that block 0 of ``members`` covers exactly one run of that many bytes. Then
    every byte a whole-block copy touches is a row of this group's own block (the bytes a per-row copy touches, plus
    the unused slots of a partial last block): groups that alias one allocation (vLLM's hybrid groups, whose blocks
    the block pool hands to one group at a time) stay as safe as with per-row copies."""
    where = f"{descriptor.layout}: group {group.name!r}"
    if not members:
        raise LayoutError(f"{where}: no streams, nothing to copy as whole blocks")
    strides = {s.block_stride for s in members}
    if len(strides) != 1:
        raise LayoutError(f"{where}: its layers step by block strides {sorted(strides)}; whole blocks need one stride")
    stride = strides.pop()
    if len({s.buffer.device for s in members}) != 1:
        raise LayoutError(f"{where}: its layers live on different devices; whole blocks need one buffer")
    spans = sorted(span for s in members for span in _row_spans(s, group))
    lo, end = spans[0][0], spans[0][0]
    for start, stop in spans:
        if start != end:
            what = "overlap" if start < end else f"a gap of {start - end} bytes"
            raise LayoutError(
                f"{where}: one block of all its layers is not one contiguous run ({what} at byte {end - lo}); "
                "whole blocks need a block-outer layout (vLLM: BLNHC, BLHNC or BHLNC) without padding"
            )
        end = stop
    if end - lo != stride:
        raise LayoutError(
            f"{where}: its layers fill {end - lo} of the {stride} bytes between blocks (layer-outer, or other data "
            "between blocks); whole blocks need a block-outer layout (vLLM: BLNHC, BLHNC or BHLNC)"
        )
    return stride


def _row_spans(stream: StreamDesc, group: GroupDesc) -> list[tuple[int, int]]:
    """(start, end) addresses of every row of block 0 of ``stream``."""
    slots = group.slots_per_block
    return [
        (start, start + stream.row_bytes)
        for n in range(slots)
        for r in range(stream.rows_per_slot)
        for start in (stream.base_ptr + n * stream.slot_stride + r * stream.row_stride,)
    ]
