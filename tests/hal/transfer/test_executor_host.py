"""The executor's host-side bookkeeping on CPU, streams faked: staged pieces follow the cost model and are memoized
(their tiling: test_pieces.py), and the per-descriptor memos stay bounded when descriptors come and go."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.backends.torch_ref import TorchBackend  # noqa: E402
from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.hal.transfer.planner import CostModel  # noqa: E402
from kvport.hal.transfer.samples import Dims, sample  # noqa: E402


@pytest.fixture
def transfer(monkeypatch):
    from kvport.hal.platforms import get_platform

    monkeypatch.setattr(torch.cuda, "Stream", lambda *args, **kwargs: None)  # no stream is used below
    return Transfer(TorchBackend(), "cpu", CostModel(piece_bytes=100), platform=get_platform("cuda"))


@pytest.mark.parametrize("tokens", [1, 7, 23])
def test_pieces_come_from_the_models_piece_size_and_are_memoized(transfer, tokens):
    from kvport.hal.transfer.pieces import stream_pieces

    d = sample("mla_odd", Dims())
    pieces = transfer.staged.piece_list(d, tokens)
    piece = transfer.model.piece_bytes_for(d.canonical_bytes(tokens))
    assert [(sub.streams, start, n) for sub, start, n in pieces] == [
        (sub.streams, start, n) for sub, start, n in stream_pieces(d, tokens, piece)
    ]
    assert transfer.staged.piece_list(d, tokens) is pieces


def test_memos_stay_bounded(transfer):
    for seed in range(300):
        d = sample("nhd", Dims(), seed=seed)  # a new descriptor each time, as when engines come and go
        transfer.staged.piece_list(d, 5)
        assert transfer.plan(d, 5, "d2h").path == "staged"
    assert len(transfer.staged._pieces) <= 257 and len(transfer._plans) <= 257
