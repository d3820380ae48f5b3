"""The server's wire format without sockets: what decodes, and the one-line refusal (with its reason) of each kind of
bad message."""

from __future__ import annotations

import json

import pytest

from kvport.server import protocol as P

KEY = "ab" * 32


def _frames(header: dict, *rest) -> list:
    return [json.dumps(header).encode(), *rest]


def test_lookup_round_trip_of_keys() -> None:
    keys = [KEY, "cd" * 32, "0" * 64]
    request = P.decode_request(_frames({"v": 1, "op": "lookup", "id": 7, "ns": "m"}, P.keys_frame(keys)), 1 << 20)
    assert (request.op, request.id, request.fields, request.keys) == ("lookup", 7, {"ns": "m"}, keys)


def test_commit_may_carry_chunk_frames() -> None:
    request = P.decode_request(_frames({"v": 1, "op": "commit", "id": 1, "rid": 3, "ok": True}, b"x" * 10), 1 << 20)
    assert request.data == [b"x" * 10]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "malformed"),
        ([b"\xff not json"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([b"{" + b" " * P.MAX_HEADER_BYTES + b"}"], "oversized"),
        ([b"{}"] * (P.MAX_FRAMES + 1), "oversized"),
        (_frames({"v": 2, "op": "ping", "id": 1}), "version"),
        (_frames({"v": 1, "op": "ping", "id": -1}), "malformed"),
        (_frames({"v": 1, "op": "ping", "id": True}), "malformed"),
        (_frames({"v": 1, "op": "rm -rf", "id": 1}), "unknown_op"),
        (_frames({"v": 1, "op": ["ping"], "id": 1}), "unknown_op"),
        (_frames({"v": 1, "op": "lookup", "id": 1}), "malformed"),  # no ns, no keys
        (_frames({"v": 1, "op": "lookup", "id": 1, "ns": "m"}), "malformed"),  # no key frame
        (_frames({"v": 1, "op": "lookup", "id": 1, "ns": 5}, b""), "malformed"),
        (_frames({"v": 1, "op": "lookup", "id": 1, "ns": "x" * 2000}, b""), "malformed"),
        (_frames({"v": 1, "op": "lookup", "id": 1, "ns": "m"}, b"\0" * 33), "bad_keys"),
        (_frames({"v": 1, "op": "lookup", "id": 1, "ns": "m"}, b"\0" * 32 * (P.MAX_KEYS + 1)), "too_many_keys"),
        (_frames({"v": 1, "op": "ping", "id": 1}, b"extra"), "malformed"),
        (_frames({"v": 1, "op": "commit", "id": 1, "rid": 1, "ok": "yes"}), "malformed"),
        (_frames({"v": 1, "op": "commit", "id": 1, "rid": 1, "ok": True}, b"x" * 100), "oversized"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(frames: list, reason: str) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(frames, 64)
    assert info.value.reason == reason
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


def test_request_id_of_a_broken_message_is_zero_or_its_own() -> None:
    assert P.request_id([b"nonsense"]) == 0
    assert P.request_id(_frames({"id": 42, "op": "nope"})) == 42
