"""Copy descriptors: the compiled, engine-neutral byte address map that every backend's gather/scatter reads.
Owns the descriptor dataclasses and canonical-chunk size arithmetic; must not know YAML, engines or kernels.

Contract (every backend implements exactly this; the torch backend is the oracle):

* A descriptor has groups (each with its own block table and tokens per block) and streams. A stream is one
  (group, layer, component) plane of engine memory. Streams are listed in canonical order: group, then layer,
  then component.
* Row address of (block b, slot n, sub-row r) in a stream is
  ``buffer.data_ptr() + offset + b*block_stride + n*slot_stride + r*row_stride``; the row is ``row_bytes``
  contiguous bytes. All strides and sizes are in bytes.
* For ``num_tokens`` tokens, a group has ``slot_count(num_tokens)`` slots; slot ``s`` lives in block
  ``block_ids[group][s // slots_per_block]`` at in-block slot ``s % slots_per_block``.
* The canonical chunk is the concatenation, over streams in order, of each stream's slots in order, each slot
  being its ``rows_per_slot`` rows back to back. ``stream_offsets`` gives where each stream starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class GroupDesc:
    """One layer group: its own block table, block size and slot compression."""

    index: int
    name: str
    tokens_per_block: int
    tokens_per_slot: int = 1
    # Opaque groups copy whole blocks as one row (in-block bytes are kernel-specific, e.g. vLLM CPU_ATTN);
    # their canonical form is only meaningful to the same layout.
    opaque: bool = False
    # Blocks the engine tensors hold (0 = not known); lets backends reject out-of-range block ids.
    num_blocks: int = 0

    @property
    def slots_per_block(self) -> int:
        return 1 if self.opaque else self.tokens_per_block // self.tokens_per_slot

    def block_count(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def holds_ids(self, lowest: int, highest: int) -> bool:
        """Whether block ids from ``lowest`` to ``highest`` all address blocks of the engine tensors."""
        return lowest >= 0 and (not self.num_blocks or highest < self.num_blocks)

    def slot_count(self, num_tokens: int) -> int:
        if self.opaque:
            return self.block_count(num_tokens)
        # A partially filled compressed slot still exists in engine memory and is copied as it is.
        return -(-num_tokens // self.tokens_per_slot)


@dataclasses.dataclass(frozen=True)
class StreamDesc:
    """One (group, layer, component) plane of engine memory, addressed in bytes from ``buffer``."""

    group: int
    layer: int
    component: str
    buffer: torch.Tensor = dataclasses.field(compare=False, repr=False)
    offset: int
    block_stride: int
    slot_stride: int
    row_stride: int
    rows_per_slot: int
    row_bytes: int

    @property
    def slot_bytes(self) -> int:
        return self.rows_per_slot * self.row_bytes

    @property
    def base_ptr(self) -> int:
        return self.buffer.data_ptr() + self.offset


@dataclasses.dataclass(frozen=True)
class CopyDescriptor:
    """Everything a backend needs to move one model's KV between engine memory and canonical chunks."""

    layout: str
    groups: tuple[GroupDesc, ...]
    streams: tuple[StreamDesc, ...]
    # Identifies the canonical chunk format (model dims, dtype, group shapes); equal fingerprints mean
    # byte-compatible canonical chunks. Opaque layouts include the layout name in it.
    fingerprint: str

    def stream_bytes(self, stream: StreamDesc, num_tokens: int) -> int:
        return self.groups[stream.group].slot_count(num_tokens) * stream.slot_bytes

    def stream_offsets(self, num_tokens: int) -> list[int]:
        return list(self._sizes(num_tokens)[0])

    def canonical_bytes(self, num_tokens: int) -> int:
        return self._sizes(num_tokens)[1]

    def _sizes(self, num_tokens: int) -> tuple[tuple[int, ...], int]:
        """(stream offsets, total bytes) for ``num_tokens``, memoized: every transfer asks several times and a
        64-stream descriptor took ~0.1 ms of host time per 256-token chunk to recompute them (H200 profile)."""
        memo = self.__dict__.setdefault("_size_memo", {})
        hit = memo.get(num_tokens)
        if hit is None:
            if len(memo) > 64:
                memo.clear()
            hit = memo[num_tokens] = self._compute_sizes(num_tokens)
        return hit

    def _compute_sizes(self, num_tokens: int) -> tuple[tuple[int, ...], int]:
        offsets, total = [], 0
        for stream in self.streams:
            offsets.append(total)
            total += self.stream_bytes(stream, num_tokens)
        return tuple(offsets), total

    def normalize_block_ids(self, block_ids: Sequence) -> list:
        """Accept one block-id list per group, or a single list when there is one group."""
        if len(self.groups) == 1 and not _is_nested(block_ids):
            return [block_ids]
        if len(block_ids) != len(self.groups):
            raise ValueError(
                f"{self.layout}: got {len(block_ids)} block-id lists, expected one per group ({len(self.groups)})"
            )
        return list(block_ids)

    def block_tables(self, block_ids: Sequence, num_tokens: int) -> list[torch.Tensor]:
        """Per group, the block ids the first ``num_tokens`` tokens use: int64 on the CPU, checked once for every
        backend. Every backend adds these ids to engine pointers, so an id outside the engine tensors (negative, past
        ``num_blocks``, or a truncated non-integer) would read or write memory that is not this KV."""
        import torch

        tables = []
        for group, table in zip(self.groups, self.normalize_block_ids(block_ids)):
            table = torch.as_tensor(table)
            if table.numel() and (table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool):
                raise ValueError(f"group {group.name!r}: block ids must be integers, got {table.dtype}")
            table = table.reshape(-1)
            need = group.block_count(num_tokens)
            if table.numel() < need:
                raise ValueError(
                    f"group {group.name!r}: {num_tokens} tokens need {need} blocks, got {table.numel()} block ids"
                )
            table = table[:need].to(device="cpu", dtype=torch.int64)
            if table.numel() and not group.holds_ids(int(table.min()), int(table.max())):
                limit = f"0..{group.num_blocks - 1}" if group.num_blocks else ">= 0"
                raise ValueError(f"group {group.name!r}: block ids must be in {limit}, got {table.tolist()}")
            tables.append(table)
        return tables


def _is_nested(block_ids: Sequence) -> bool:
    # ndim, not torch's dim(): engines also hand numpy block tables (a 2-D one is one table per group).
    if hasattr(block_ids, "ndim"):
        return block_ids.ndim > 1
    if len(block_ids) == 0:
        return False
    first = block_ids[0]
    return isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) >= 1
