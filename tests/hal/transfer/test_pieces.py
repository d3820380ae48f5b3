"""Staged pieces on CPU: a move's streams grouped in canonical order, tiling the chunk, each piece but the last at
least the asked size, one piece when the move is smaller than that."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from kvport.hal.transfer.pieces import stream_pieces  # noqa: E402
from kvport.hal.transfer.samples import Dims, sample  # noqa: E402


@pytest.mark.parametrize("name", ["mla_odd", "nhd"])
@pytest.mark.parametrize("tokens", [1, 7, 23])
@pytest.mark.parametrize("piece", [1, 100, 1 << 30])
def test_pieces_tile_the_chunk_in_order(name, tokens, piece):
    d = sample(name, Dims())
    pieces = stream_pieces(d, tokens, piece)
    assert [s for sub, _, _ in pieces for s in sub.streams] == list(d.streams)
    offset = 0
    for sub, start, nbytes in pieces:
        assert start == offset and nbytes == sub.canonical_bytes(tokens)
        offset += nbytes
    assert offset == d.canonical_bytes(tokens)
    assert all(n >= piece for _, _, n in pieces[:-1])
    if piece >= d.canonical_bytes(tokens):
        assert len(pieces) == 1
    if piece == 1:
        assert len(pieces) == len(d.streams)  # every stream is a piece of its own
