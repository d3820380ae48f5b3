"""Chunk keys: a blake2b hash chain over token chunks, rooted in a namespace (model fingerprint) and a user salt.
Owns key derivation only; must not use Python's ``hash`` (salted per process) or know where chunks are stored."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from typing import Any

# 32-byte digests: collisions between chunks of different prefixes must be out of reach, not just unlikely.
KEY_BYTES = 32
# Bump when the derivation changes, so old stored chunks can never be read as new ones.
KEY_VERSION = b"kvport-chunk-key-v1"


def token_bytes(tokens: Any) -> bytes:
    """Tokens as little-endian int64 bytes, whatever container they come in (list, tuple, array, tensor)."""
    if hasattr(tokens, "detach"):  # torch tensor: avoid a Python-level loop
        import torch

        return tokens.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().astype("<i8").tobytes()
    if hasattr(tokens, "astype"):  # numpy array
        return tokens.astype("<i8").tobytes()
    return struct.pack(f"<{len(tokens)}q", *tokens)


@functools.lru_cache(maxsize=64)  # lookups call this per request; the namespace rarely changes
def root_digest(namespace: str, salt: str = "") -> bytes:
    """The chain's starting point: every key of a namespace/salt pair descends from it, so no key is shared."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (KEY_VERSION, namespace.encode(), salt.encode()):
        h.update(struct.pack("<Q", len(part)))  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        h.update(part)
    return h.digest()


def chunk_keys(tokens: Sequence[int] | Any, chunk_tokens: int, namespace: str, salt: str = "") -> list[str]:
    """One hex key per FULL chunk of ``tokens``; key i depends on chunks 0..i and on namespace and salt."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    raw = token_bytes(tokens)
    step = chunk_tokens * 8
    prev = root_digest(namespace, salt)
    keys = []
    for start in range(0, len(raw) - step + 1, step):
        prev = hashlib.blake2b(prev + raw[start : start + step], digest_size=KEY_BYTES).digest()
        keys.append(prev.hex())
    return keys
