"""Staged pieces: a move's streams grouped, in canonical order, into pieces that each go through one staging buffer.
Owns the grouping only; must not allocate staging, pick piece sizes (the planner's CostModel does) or launch."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvport.layouts.descriptor import CopyDescriptor


def stream_pieces(descriptor: CopyDescriptor, num_tokens: int, piece: int) -> list[tuple[CopyDescriptor, int, int]]:
    """Consecutive streams grouped into pieces of at least ``piece`` bytes (the last may be smaller):
    (sub-descriptor, chunk offset, bytes) each."""
    offsets = descriptor.stream_offsets(num_tokens)
    total = descriptor.canonical_bytes(num_tokens)
    pieces, start = [], 0
    for i in range(1, len(descriptor.streams) + 1):
        end = offsets[i] if i < len(offsets) else total
        if i == len(descriptor.streams) or end - offsets[start] >= piece:
            sub = dataclasses.replace(descriptor, streams=descriptor.streams[start:i])
            pieces.append((sub, offsets[start], end - offsets[start]))
            start = i
    return pieces
