"""Chunk keys every engine can derive: SGLang HiCache's page-hash chain (sha256 over each page's token ids, chained),
mapped into kvport's namespace. Owns that derivation only; must not know where chunks are stored or import SGLang.

SGLang's storage backends are handed page hashes, never token ids (``batch_exists/batch_get_v1/batch_set_v1`` in
sglang/srt/mem_cache/hicache_storage.py). Engines that do see token ids (vLLM, TensorRT-LLM) compute the same hashes
here, so a chunk stored through one engine is found through another when chunks are SGLang's pages
(``chunk_tokens == page_size``). The chain is sglang/srt/mem_cache/cpp_utils/hash_binding.cpp (0.5.23) with no seed:
``h_0 = sha256(page_0)``, ``h_i = sha256(h_{i-1} || page_i)``, each page as little-endian uint32 token ids, or, when
a token of the page exceeds uint32, the byte 0xff then the page as little-endian uint64. A request SGLang seeds with
a cache salt or extra key (LoRA, multimodal) gets other hashes: a miss, never a wrong hit.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from kvport.store.keys import KEY_BYTES, root_digest

# Bump when the mapping from page hash to kvport key changes.
PAGE_KEY_TAG = b"kvport-sglang-page-v1"
_UINT32_MAX = 0xFFFFFFFF
_INT64_MAX = (1 << 63) - 1
_WIDE_TAG = b"\xff"  # hash_binding.cpp: an odd byte count separates wide pages from uint32 pages


def sglang_page_hashes(tokens: Sequence[int] | Any, page_tokens: int, seed: str | None = None) -> Iterator[str]:
    """SGLang's hex page hash for each FULL page of ``tokens`` (``seed``: SGLang's prior hash, hex, or None)."""
    if page_tokens <= 0:
        raise ValueError(f"page_tokens must be positive, got {page_tokens}")
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().tolist()
    elif hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    prev = bytes.fromhex(seed) if seed else b""
    if prev and len(prev) != 32:
        raise ValueError("seed must be a 32-byte sha256 digest in hex")
    narrow = struct.Struct(f"<{page_tokens}I")
    wide = struct.Struct(f"<{page_tokens}Q")
    for start in range(0, len(tokens) - page_tokens + 1, page_tokens):
        page = [int(t) for t in tokens[start : start + page_tokens]]
        low, high = min(page), max(page)
        if low < 0 or high > _INT64_MAX:
            raise ValueError(f"token id out of SGLang's range (non-negative int64): {low if low < 0 else high}")
        data = narrow.pack(*page) if high <= _UINT32_MAX else _WIDE_TAG + wide.pack(*page)
        prev = hashlib.sha256(prev + data).digest()
        yield prev.hex()


def key_for_page_hash(page_hash: str, namespace: str, salt: str = "") -> str:
    """The kvport chunk key of one SGLang page hash in ``namespace``/``salt`` (64 hex characters). ValueError for a
    page hash that is not 64 hex characters (a key scheme kvport does not know)."""
    if len(page_hash) != 64:
        raise ValueError(f"expected a sha256 page hash (64 hex characters), got {len(page_hash)} characters")
    digest = bytes.fromhex(page_hash)
    h = hashlib.blake2b(root_digest(namespace, salt), digest_size=KEY_BYTES)
    h.update(PAGE_KEY_TAG)
    h.update(digest)
    return h.hexdigest()


def iter_page_keys(tokens: Sequence[int] | Any, chunk_tokens: int, namespace: str, salt: str = "") -> Iterator[str]:
    """One key per full chunk of ``tokens``, each chunk being one SGLang page of ``chunk_tokens`` tokens."""
    for page_hash in sglang_page_hashes(tokens, chunk_tokens):
        yield key_for_page_hash(page_hash, namespace, salt)
