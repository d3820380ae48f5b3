"""Chunk stacking: one descriptor that moves k chunks of one request, each with its own block ids, in one launch.
Owns the stacked descriptor and its block-id order; must not launch kernels or choose when to stack (executor.py).

A stacked descriptor repeats the groups and streams k times, copy j's groups numbered after copy j-1's. Block ids
are then per (copy, group), so copy j reads chunk j's blocks, and the canonical order of the stacked descriptor is
chunk 0's canonical bytes, then chunk 1's, and so on: one gather fills k consecutive chunks of a staging buffer.
Under load every kernel launch waits for SMs the engine holds, so one launch for k chunks instead of k launches is
what keeps a request's small chunks moving."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvport.layouts.descriptor import CopyDescriptor


def stack(descriptor: CopyDescriptor, copies: int) -> CopyDescriptor:
    """``descriptor`` repeated ``copies`` times (groups and streams), for ``stacked_block_ids``' tables."""
    if copies < 1:
        raise ValueError(f"stack: copies must be positive, got {copies}")
    n = len(descriptor.groups)
    groups = tuple(
        dataclasses.replace(g, index=j * n + g.index, name=f"{g.name}#{j}")
        for j in range(copies)
        for g in descriptor.groups
    )
    streams = tuple(dataclasses.replace(s, group=j * n + s.group) for j in range(copies) for s in descriptor.streams)
    return dataclasses.replace(descriptor, layout=f"{descriptor.layout}x{copies}", groups=groups, streams=streams)


def stacked_block_ids(descriptor: CopyDescriptor, tables: Sequence) -> list:
    """The stacked descriptor's block ids: chunk j's table for each group, chunk after chunk."""
    out: list = []
    for table in tables:
        out.extend(descriptor.normalize_block_ids(table))
    return out
