"""Tests for the local-disk tier's namespace records (``kvport cache``): the digest in each chunk header, listing per
namespace, clearing one namespace or all, and chunks written before namespaces were recorded staying valid."""

from __future__ import annotations

import torch

from kvport.store.envelope import NO_NAMESPACE, namespace_digest
from kvport.store.keys import chunk_keys
from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import HEADER_BYTES, LocalDiskTier

FP = "layout-fp-1"
N = 4096


def _tier(root, namespace: str) -> LocalDiskTier:
    tier = LocalDiskTier(root, capacity_bytes=1 << 30)
    tier.use_namespace(namespace)
    return tier


def _fill(tier: LocalDiskTier, count: int, seed: int) -> list[str]:
    keys = chunk_keys(list(range(count)), 1, tier.namespace or "none", extra=bytes([seed]))
    for key in keys:
        assert tier.put_one(key, FP, torch.full((N,), seed, dtype=torch.uint8))
    return keys


def test_list_and_clear_by_namespace(tmp_path):
    a, b = _tier(tmp_path, '{"model":"a"}'), _tier(tmp_path, '{"model":"b"}')
    keys_a, keys_b = _fill(a, 3, 1), _fill(b, 2, 2)
    usage = {u.name: u for u in a.namespaces()}
    assert set(usage) == {'{"model":"a"}', '{"model":"b"}'}
    assert (usage['{"model":"a"}'].chunks, usage['{"model":"a"}'].bytes) == (3, 3 * (HEADER_BYTES + N))
    assert usage['{"model":"b"}'].digest == namespace_digest('{"model":"b"}')
    assert a.clear([namespace_digest('{"model":"a"}')]) == 3
    assert not any(a.contains_one(k) for k in keys_a)
    dst = torch.empty(N, dtype=torch.uint8)
    assert all(b.get_one(k, FP, dst) is ReadResult.HIT for k in keys_b)
    assert [u.name for u in b.namespaces()] == ['{"model":"b"}']
    assert b.clear() == 2 and b.namespaces() == []


def test_chunks_without_a_recorded_namespace_stay_valid_and_are_listed(tmp_path):
    """A chunk file from before namespaces were recorded (16 zero bytes in that field) still reads as a hit."""
    old = LocalDiskTier(tmp_path, capacity_bytes=1 << 30)  # no use_namespace: records NO_NAMESPACE
    key = _fill(old, 1, 3)[0]
    assert old.path(key).read_bytes()[112:HEADER_BYTES] == NO_NAMESPACE
    reader = _tier(tmp_path, "other")
    dst = torch.empty(N, dtype=torch.uint8)
    assert reader.get_one(key, FP, dst) is ReadResult.HIT and int(dst[0]) == 3
    [usage] = reader.namespaces()
    assert (usage.digest, usage.name, usage.chunks) == (NO_NAMESPACE, "", 1)


def test_a_reader_with_another_layout_never_deletes_the_chunk(tmp_path):
    tier = _tier(tmp_path, "ns")
    key = _fill(tier, 1, 4)[0]
    assert tier.get_one(key, "another-layout", torch.empty(N, dtype=torch.uint8)) is ReadResult.WRONG_FINGERPRINT
    assert tier.contains_one(key)
