"""Triton gather/scatter over compiled segment tables (kvport.hal.transfer.segments): one kernel, both directions.
Owns the kernel and its launch; must not know layouts by name, pick transfer paths, or use vendor-only intrinsics.

Portability: plain tl.load/tl.store with integer offsets from one real pointer, no inline asm, no tl.extra.*,
so the same source runs on NVIDIA, AMD and Intel XPU Triton and under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvport.hal.transfer.segments import NCOL


@triton.jit
def segment_copy_kernel(
    anchor,  # the real pointer every element offset is relative to (engine and chunk alike)
    table,  # int64 [n_streams, NCOL]
    blocks,  # int64 flat block ids
    chunk_off,  # element offset of the canonical chunk from the anchor
    n_streams,
    tiles_per_stream,
    NCOLS: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = n_streams * tiles_per_stream
    # Persistent loop: a grid smaller than the tile count (zero-copy's bounded CTAs) still covers everything.
    for t in range(pid, total, nprog):
        sid = t // tiles_per_stream
        tile = t % tiles_per_stream
        row_ptr = table + sid * NCOLS
        supers = tl.load(row_ptr + 7)
        if tile * BLOCK_S < supers:
            eng_base = tl.load(row_ptr + 0)
            bstride = tl.load(row_ptr + 1)
            sstride = tl.load(row_ptr + 2)
            rstride = tl.load(row_ptr + 3)
            rows = tl.load(row_ptr + 4)
            row_len = tl.load(row_ptr + 5)
            can_base = tl.load(row_ptr + 6) + chunk_off
            spb = tl.load(row_ptr + 8)
            boff = tl.load(row_ptr + 9)
            length = tl.load(row_ptr + 10)
            s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
            smask = s < supers
            blk = tl.load(blocks + boff + s // spb, mask=smask, other=0)
            eng_slot = eng_base + blk * bstride + (s % spb) * sstride
            can_slot = can_base + s * rows * row_len
            for r in range(rows):
                eng_row = tl.multiple_of(eng_slot + r * rstride, VEC)
                can_row = tl.multiple_of(can_slot + r * row_len, VEC)
                # Elements of this row that belong to num_tokens (a merged block may run past the last token).
                valid = tl.minimum(row_len, length - (s * rows + r) * row_len)
                valid = tl.multiple_of(tl.where(smask, valid, 0), VEC)
                for c in range(0, row_len, BLOCK_E):
                    e = c + tl.arange(0, BLOCK_E)
                    mask = e[None, :] < valid[:, None]
                    eng = anchor + (eng_row[:, None] + e[None, :])
                    can = anchor + (can_row[:, None] + e[None, :])
                    if GATHER:
                        tl.store(can, tl.load(eng, mask=mask), mask=mask)
                    else:
                        tl.store(eng, tl.load(can, mask=mask), mask=mask)


# Elements moved per inner iteration of one program: 4096 x 4 B = 16 KiB keeps 8 16-byte loads in flight per
# thread at 4 warps, which is what a bandwidth-bound copy needs on current GPUs.
TILE_ELEMENTS = 4096


def tile_shape(max_row_len: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_E): a row-length block that covers short rows whole, and enough slots to fill the tile.

    BLOCK_S stays >= 2: with a [1, N] tile Triton 3.6-3.9 drops the 16-byte vectors (PTX showed ld.global.b32
    instead of ld.global.v4 for BLOCK_S=1, BLOCK_E=4096, sm_90), which cost NHD a third of its D2D speed."""
    block_e = min(triton.next_power_of_2(max(1, max_row_len)), TILE_ELEMENTS // 2)
    block_s = max(1, TILE_ELEMENTS // block_e)
    return block_s, block_e


def launch(
    anchor,
    table,
    blocks,
    chunk_off: int,
    n_streams: int,
    max_supers: int,
    max_row_len: int,
    vec: int,
    gather: bool,
    max_programs: int | None = None,
    num_warps: int = 4,
) -> None:
    """Launch one segment copy on the current stream of the anchor's device."""
    block_s, block_e = tile_shape(max_row_len)
    tiles = triton.cdiv(max_supers, block_s)
    total = n_streams * tiles
    if total == 0:
        return
    grid = (total if max_programs is None else max(1, min(total, max_programs)),)
    segment_copy_kernel[grid](
        anchor,
        table,
        blocks,
        chunk_off,
        n_streams,
        tiles,
        NCOLS=NCOL,
        GATHER=gather,
        BLOCK_S=block_s,
        BLOCK_E=block_e,
        VEC=vec,
        num_warps=num_warps,
    )
