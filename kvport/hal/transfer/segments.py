"""Compiles a CopyDescriptor into the flat per-stream parameter tables that the Triton and native kernels read.
Owns contiguous-run merging, vector-width choice and the table format; must not launch kernels or pick a path.

Table format (int64, ``NCOL`` columns per stream, all sizes in *elements* of ``width`` bytes):

====  ==============================================================================================
col   meaning
====  ==============================================================================================
0     engine base: (stream.base_ptr - anchor) / width
1     block stride
2     super-slot stride (a super-slot is ``merge`` consecutive descriptor slots that are contiguous)
3     row stride
4     rows per super-slot
5     row length
6     canonical offset of the stream inside the chunk
7     super-slot count for num_tokens
8     super-slots per block
9     offset of the stream's group in the flat block-id table
10    stream length in the chunk (masks the tail of a partly used super-slot)
11    super-slots per tile (native kernel: one warp copies one tile; small slots are batched)
12    tile count
====  ==============================================================================================

The canonical position of (super-slot s, row r, element e) is ``col6 + (s*rows + r)*row_len + e``; it is valid
only while below ``col6 + col10``. This is exactly descriptor.py's canonical order, because merging only folds
runs that are contiguous on both sides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc

if TYPE_CHECKING:
    import torch

NCOL = 13
# Elements of `width` bytes one native warp should move per tile: 512 x 16 B = 8 KiB keeps 4 vectors per lane
# in flight across a few row instances even when a slot is one 128-byte row (MLA rope planes).
TILE_VECTORS = 512
WIDTHS = (16, 8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class MergedStream:
    """One stream after folding contiguous rows and slots; sizes in bytes."""

    stream: StreamDesc
    rows: int
    row_len: int
    row_stride: int
    slot_stride: int
    merge: int  # descriptor slots per super-slot
    super_per_block: int

    def super_count(self, group: GroupDesc, num_tokens: int) -> int:
        return -(-group.slot_count(num_tokens) // self.merge)


def merge_stream(stream: StreamDesc, group: GroupDesc) -> MergedStream:
    """Fold rows that touch into one row, then whole blocks into one row when their slots touch too.

    Folding is what makes NHD one 32 KiB copy per (layer, K/V, block) instead of 16 x 2 KiB rows."""
    rows, row_len, row_stride = stream.rows_per_slot, stream.row_bytes, stream.row_stride
    if rows > 1 and row_stride == row_len:
        rows, row_len, row_stride = 1, rows * row_len, rows * row_len
    spb = group.slots_per_block
    if rows == 1 and spb > 1 and stream.slot_stride == row_len:
        return MergedStream(stream, 1, row_len * spb, row_len * spb, stream.block_stride, spb, 1)
    return MergedStream(stream, rows, row_len, row_stride, stream.slot_stride, 1, spb)


@dataclasses.dataclass
class Launch:
    """Streams that share one kernel launch (one element width)."""

    width: int
    stream_indices: list[int]
    table: list[list[int]]  # NCOL ints per stream, element units
    max_row_len: int  # elements
    max_supers: int  # most super-slots of any stream in this launch
    max_rows: int
    max_tiles: int = 0  # most tiles of any stream (native kernel grid)


@dataclasses.dataclass
class SegmentPlan:
    """Everything a kernel launcher needs, before any device tensor exists."""

    anchor: int  # address the element offsets are relative to
    block_offsets: list[int]  # per group, offset into the flat block table
    launches: list[Launch]
    canonical_bytes: int


def _width_for(values: Sequence[int]) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, abs(int(v)))
    for w in WIDTHS:
        if g % w == 0:
            return w
    return 1


def compile_plan(
    descriptor: CopyDescriptor,
    num_tokens: int,
    chunk_ptr: int,
    anchor: int,
    max_width: int = 16,
) -> SegmentPlan:
    """Build the launches for one (descriptor, num_tokens) with the canonical chunk at ``chunk_ptr``.

    ``anchor`` is the address element offsets are taken from (the kernels add them to one real pointer);
    ``max_width`` caps the element width (Triton moves at most 8-byte elements; vectors come from hints)."""
    groups = descriptor.groups
    offsets = descriptor.stream_offsets(num_tokens)
    block_offsets = group_block_offsets(descriptor, num_tokens)
    by_width: dict[tuple[int, int], Launch] = {}
    for index, (stream, offset) in enumerate(zip(descriptor.streams, offsets)):
        group = groups[stream.group]
        merged = merge_stream(stream, group)
        supers = merged.super_count(group, num_tokens)
        length = descriptor.stream_bytes(stream, num_tokens)
        if supers == 0 or length == 0:
            continue
        canon = chunk_ptr + offset
        width = _width_for(
            [
                stream.base_ptr - anchor,
                canon - anchor,
                stream.block_stride,
                merged.slot_stride if merged.super_per_block > 1 else 0,
                merged.row_stride if merged.rows > 1 else 0,
                merged.row_len,
                length,
                max_width,
            ]
        )
        row = [
            (stream.base_ptr - anchor) // width,
            stream.block_stride // width,
            merged.slot_stride // width,
            merged.row_stride // width,
            merged.rows,
            merged.row_len // width,
            (canon - chunk_ptr) // width,
            supers,
            merged.super_per_block,
            block_offsets[stream.group],
            length // width,
        ]
        per_tile = max(1, -(-TILE_VECTORS // (merged.rows * (merged.row_len // width))))
        tiles = -(-supers // per_tile)
        row += [per_tile, tiles]
        # One launch per (width, row-length class): Triton sizes its tile from the longest row, so a 128-byte
        # plane sharing a launch with 1 KiB rows would waste 7/8 of every tile.
        bucket = 1 << max(0, (merged.row_len - 1).bit_length())
        launch = by_width.setdefault((width, bucket), Launch(width, [], [], 0, 0, 0))
        launch.stream_indices.append(index)
        launch.table.append(row)
        launch.max_row_len = max(launch.max_row_len, row[5])
        launch.max_supers = max(launch.max_supers, supers)
        launch.max_rows = max(launch.max_rows, merged.rows)
        launch.max_tiles = max(launch.max_tiles, tiles)
    # Widest first: the bulk of the bytes usually sits there.
    launches = [by_width[k] for k in sorted(by_width, reverse=True)]
    return SegmentPlan(anchor, block_offsets, launches, descriptor.canonical_bytes(num_tokens))


# Columns holding element counts/offsets (scaled when a kernel uses narrower elements than the plan's width).
ELEMENT_COLUMNS = (0, 1, 2, 3, 5, 6, 10)


def scaled_table(launch: Launch, elem_bytes: int) -> list[list[int]]:
    """The launch's table in units of ``elem_bytes`` (a divisor of launch.width)."""
    factor = launch.width // elem_bytes
    return [[v * factor if c in ELEMENT_COLUMNS else v for c, v in enumerate(row)] for row in launch.table]


def group_block_offsets(descriptor: CopyDescriptor, num_tokens: int) -> list[int]:
    """Where each group's ids start in flat_block_ids' table (groups in order, block_count ids each)."""
    offsets, total = [], 0
    for group in descriptor.groups:
        offsets.append(total)
        total += group.block_count(num_tokens)
    return offsets


def flat_block_ids(
    descriptor: CopyDescriptor, block_ids: Sequence, num_tokens: int, pin_memory: bool = False
) -> torch.Tensor:
    """The block ids each group needs for num_tokens, concatenated in group order (int64, CPU; page-locked when
    ``pin_memory``, for an asynchronous upload)."""
    import torch

    flat = _flat_int_list(descriptor, block_ids, num_tokens)
    if flat is not None:
        return torch.tensor(flat, dtype=torch.int64, pin_memory=pin_memory)
    parts = descriptor.block_tables(block_ids, num_tokens)
    joined = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return joined.pin_memory() if pin_memory else joined


def flat_block_id_list(descriptor: CopyDescriptor, block_ids: Sequence, num_tokens: int) -> list[int]:
    """``flat_block_ids`` as a list of Python ints (what a native call takes as its argument)."""
    flat = _flat_int_list(descriptor, block_ids, num_tokens)
    return flat if flat is not None else flat_block_ids(descriptor, block_ids, num_tokens).tolist()


def _flat_int_list(descriptor: CopyDescriptor, block_ids: Sequence, num_tokens: int) -> list[int] | None:
    """The same ids and the same checks as ``CopyDescriptor.block_tables`` when every table is a list or tuple of
    Python ints (what engines and the cache hand over), on Python ints: per chunk, the torch calls of the general
    path (~8 per group) were most of a DeepSeek-V4 chunk's host time. None: take the general path (it also words
    every error)."""
    try:
        tables = descriptor.normalize_block_ids(block_ids)
    except ValueError:
        return None
    flat: list[int] = []
    for group, table in zip(descriptor.groups, tables):
        if not isinstance(table, (list, tuple)):
            return None
        need = group.block_count(num_tokens)
        ids = table[:need]
        if len(ids) < need or any(type(i) is not int for i in ids):
            return None
        if ids and not group.holds_ids(min(ids), max(ids)):
            return None
        flat.extend(ids)
    return flat


def check_buffer(name: str, tensor: torch.Tensor, need: int, engine_device=None) -> None:
    """A chunk the kernels can address: contiguous uint8 of ``need`` bytes, and pinned when it is host memory
    for engine memory on ``engine_device`` (kernels reach it through its mapped address; pageable memory faults)."""
    import torch

    if tensor.dtype != torch.uint8 or not tensor.is_contiguous() or tensor.numel() < need:
        raise ValueError(
            f"{name}: must be a contiguous uint8 tensor with >= {need} bytes, got {tensor.dtype} x {tensor.numel()}"
            f"{'' if tensor.is_contiguous() else ' (not contiguous)'}"
        )
    if engine_device is not None and engine_device.type != "cpu" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            raise ValueError(f"{name}: a host chunk must be pinned (it is read through its mapped address)")
