"""The wire protocol between `kvport server` and its clients: message framing, per-op header schemas and limits.
Owns encoding, decoding and validation of every message; must not touch the store, sockets or shared memory.

A message is a ZMQ multipart: one JSON header frame, then binary frames. Chunk keys travel as one frame of 32-byte
digests (the hex keys' bytes), chunk bytes (only on the copy transport) as one frame per chunk. Every reply carries
the request's ``id``; a refused request gets ``{"id": ..., "error": "<one line>", "reason": "<label>"}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

VERSION = 1
KEY_BYTES = 32
# A header is a few hundred bytes; 64 KiB leaves room for long namespaces and lists of chunk indices.
MAX_HEADER_BYTES = 64 << 10
# Keys in one message: a 1M-token prompt at 128 tokens per chunk (8192 keys, 256 KiB of digests) fits.
MAX_KEYS = 8192
# Frames in one message: a header, a key frame and one frame per chunk.
MAX_FRAMES = MAX_KEYS + 2
MAX_TEXT = 1024  # namespaces, fingerprints, tokens, names
TRANSPORTS = ("shm", "copy")


class ProtocolError(ValueError):
    """A message this side refuses; ``reason`` is the metric label, the text a one-line description."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e18


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


def _indices(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_KEYS and all(_count(v) for v in value)


# op -> (required fields, optional fields, whether a key frame follows, most data frames)
SCHEMAS: dict[str, tuple[dict, dict, bool, int]] = {
    "hello": ({"transport": _text, "pid": _count}, {"token": _text, "name": _text}, False, 0),
    "ping": ({}, {}, False, 0),
    "bye": ({}, {}, False, 0),
    "open": ({"ns": _text, "chunk_tokens": _count, "chunk_bytes": _count, "fingerprint": _text}, {}, False, 0),
    "lookup": ({"ns": _text}, {}, True, 0),
    "reserve": ({"ns": _text, "start": _count}, {}, True, 0),
    # On the copy transport a commit carries one data frame per reserved chunk.
    "commit": ({"rid": _count, "ok": _flag}, {"nbytes": _count, "seconds": _number}, False, MAX_KEYS),
    "pin": ({"ns": _text}, {}, True, 0),
    "release": ({"pin": _count, "ok": _flag}, {"nbytes": _count, "seconds": _number}, False, 0),
    "flush": ({}, {"timeout": _number}, False, 0),
    "stats": ({}, {}, False, 0),
}


class Request:
    """One decoded, validated client message."""

    __slots__ = ("op", "id", "fields", "keys", "data")

    def __init__(self, op: str, rid: int, fields: dict, keys: list[str], data: list) -> None:
        self.op, self.id, self.fields, self.keys, self.data = op, rid, fields, keys, data


def encode(header: dict[str, Any], frames: Sequence[Any] = ()) -> list[Any]:
    return [json.dumps(header, separators=(",", ":")).encode(), *frames]


def keys_frame(keys: Sequence[str]) -> bytes:
    """Hex chunk keys as one frame of raw digests (half the bytes, no per-key framing)."""
    return bytes.fromhex("".join(keys))


def keys_from_frame(frame: bytes | memoryview) -> list[str]:
    raw = bytes(frame)
    if len(raw) % KEY_BYTES:
        raise ProtocolError("bad_keys", f"key frame of {len(raw)} bytes is not a multiple of {KEY_BYTES}")
    if len(raw) // KEY_BYTES > MAX_KEYS:
        raise ProtocolError("too_many_keys", f"{len(raw) // KEY_BYTES} keys in one message (at most {MAX_KEYS})")
    text = raw.hex()
    step = 2 * KEY_BYTES
    return [text[i : i + step] for i in range(0, len(text), step)]


def _header(frame: bytes | memoryview) -> dict:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(frame)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(frame))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed", "header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a JSON object")
    return header


def request_id(frames: Sequence[Any]) -> int:
    """The ``id`` of a message as far as it can be read (0 when it cannot), for the error reply."""
    try:
        rid = _header(frames[0]).get("id", 0)
        return rid if _count(rid) else 0
    except (ProtocolError, IndexError):
        return 0


def decode_request(frames: Sequence[Any], max_data_bytes: int) -> Request:
    """Validate a client message (after the routing id) against its op's schema and the size limits."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError("oversized", f"{len(frames)} frames in one message (at most {MAX_FRAMES})")
    header = _header(frames[0])
    op, rid, version = header.get("op"), header.get("id"), header.get("v")
    if version != VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, this server speaks {VERSION}")
    if not _count(rid):
        raise ProtocolError("malformed", "missing or bad request id")
    schema = SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise ProtocolError("unknown_op", f"unknown op {str(op)[:40]!r}")
    required, optional, has_keys, max_data = schema
    fields = {}
    for name, check in (*required.items(), *optional.items()):
        if name not in header:
            if name in required:
                raise ProtocolError("malformed", f"{op}: missing field {name!r}")
            continue
        if not check(header[name]):
            raise ProtocolError("malformed", f"{op}: bad value for {name!r}")
        fields[name] = header[name]
    rest = list(frames[1:])
    keys: list[str] = []
    if has_keys:
        if not rest:
            raise ProtocolError("malformed", f"{op}: missing key frame")
        keys = keys_from_frame(rest.pop(0))
    if len(rest) > max_data:
        raise ProtocolError("malformed", f"{op}: {len(rest)} unexpected frames")
    total = sum(len(f) for f in rest)
    if total > max_data_bytes:
        raise ProtocolError("oversized", f"{op}: {total} bytes of chunk data (at most {max_data_bytes})")
    return Request(op, rid, fields, keys, rest)


def decode_reply(frames: Sequence[Any]) -> tuple[dict, list]:
    """A server reply: (header, data frames). Raises ProtocolError on a malformed reply."""
    if not frames:
        raise ProtocolError("malformed", "empty reply")
    return _header(frames[0]), list(frames[1:])
