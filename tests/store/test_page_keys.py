"""SGLang-compatible chunk keys (kvport/store/page_keys.py): the page-hash chain and its mapping into kvport keys.
The live comparison with SGLang's own hash extension is tests/engines/test_sglang_keys.py (marker sglang)."""

from __future__ import annotations

import hashlib
import struct

import pytest

from kvport.cache.config import CacheConfig
from kvport.errors import UserError
from kvport.store.chunk_store import ChunkStore
from kvport.store.keys import chunk_keys
from kvport.store.page_keys import iter_page_keys, key_for_page_hash, sglang_page_hashes

# SGLang 0.5.23's get_hash_str(list(range(8)), None, page_size=4), printed by its compiled hash extension.
SGLANG_RANGE8_PAGE4 = [
    "baed642339816affb3fe8719792d0e4ce82f12db72b7373d244eaa65445800fe",
    "01414b052706d93bd0f1f1646c0e8ca2fa8ef5efd7bcc99f7a1cee8eb11ad052",
]


def test_page_hashes_match_sglangs_recorded_output() -> None:
    assert list(sglang_page_hashes(list(range(8)), 4)) == SGLANG_RANGE8_PAGE4


def test_partial_tail_page_has_no_hash_and_numpy_and_tensors_agree() -> None:
    import numpy as np
    import torch

    tokens = list(range(11))
    assert list(sglang_page_hashes(tokens, 4)) == SGLANG_RANGE8_PAGE4
    assert list(sglang_page_hashes(np.array(tokens), 4)) == SGLANG_RANGE8_PAGE4
    assert list(sglang_page_hashes(torch.tensor(tokens), 4)) == SGLANG_RANGE8_PAGE4


def test_wide_tokens_use_the_tagged_uint64_encoding() -> None:
    page = [1, 2, 3, 1 << 33]
    want = hashlib.sha256(b"\xff" + struct.pack("<4Q", *page)).hexdigest()
    assert list(sglang_page_hashes(page, 4)) == [want]
    with pytest.raises(ValueError, match="non-negative int64"):
        list(sglang_page_hashes([1, -2, 3, 4], 4))


def test_seed_changes_every_hash() -> None:
    seeded = list(sglang_page_hashes(list(range(8)), 4, seed="ab" * 32))
    assert all(a != b for a, b in zip(seeded, SGLANG_RANGE8_PAGE4))


def test_keys_separate_namespaces_and_salts_and_differ_from_the_kvport_chain() -> None:
    tokens = list(range(64))
    base = list(iter_page_keys(tokens, 16, "m|kv=bfloat16|tp0/1"))
    assert len(base) == 4 and len(set(base)) == 4 and all(len(k) == 64 for k in base)
    assert set(base).isdisjoint(iter_page_keys(tokens, 16, "m|kv=bfloat16|tp1/2"))
    assert set(base).isdisjoint(iter_page_keys(tokens, 16, "m|kv=bfloat16|tp0/1", salt="tenant"))
    assert set(base).isdisjoint(chunk_keys(tokens, 16, "m|kv=bfloat16|tp0/1"))
    # Each key depends on the whole prefix: changing token 0 changes every key.
    assert set(base).isdisjoint(iter_page_keys([7] + tokens[1:], 16, "m|kv=bfloat16|tp0/1"))


def test_key_for_page_hash_refuses_other_hash_formats() -> None:
    with pytest.raises(ValueError, match="64 hex"):
        key_for_page_hash("abc", "ns")
    with pytest.raises(ValueError):
        key_for_page_hash("zz" * 32, "ns")


def test_chunk_store_derives_page_keys_under_the_sglang_scheme() -> None:
    tokens = list(range(100, 164))
    store = ChunkStore(CacheConfig(chunk_tokens=16, key_scheme="sglang"), "ns")
    pages = list(sglang_page_hashes(tokens, 16))
    assert store.keys(tokens) == [key_for_page_hash(h, "ns") for h in pages]
    plain = ChunkStore(CacheConfig(chunk_tokens=16), "ns")
    assert plain.keys(tokens) == chunk_keys(tokens, 16, "ns")


def test_unknown_key_scheme_is_one_line() -> None:
    with pytest.raises(UserError, match=r"key_scheme='sha1', expected kvport or sglang$"):
        CacheConfig(key_scheme="sha1")
