"""Scenarios for test_local_disk_faults that run inside a private mount namespace (tests/private_mount.py), printing
one JSON line. 'full ROOT': a disk tier whose bytes exceed a small tmpfs at ROOT keeps storing (evicting on ENOSPC).
'readonly ROOT': a cache engine over a read-only bind mount of a populated directory starts, looks up and loads."""

from __future__ import annotations

import json
import logging
import sys

import torch

from kvport.store.keys import chunk_keys
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import LocalDiskTier

FP = "fault-test"
FULL_CHUNK = 512 * 1024
FULL_WRITES = 40
RO_CHUNK_TOKENS = 32


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def payload(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (FULL_CHUNK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def full(root: str) -> dict:
    logs = Collect()
    logging.getLogger("kvport.store").addHandler(logs)
    metrics = CacheMetrics("full-disk")
    tier = LocalDiskTier(root, 1 << 30, metrics=metrics)
    keys = chunk_keys(list(range(FULL_WRITES)), 1, "full-disk")
    results = [tier.put_one(key, FP, payload(i)) for i, key in enumerate(keys)]
    dst = torch.empty(FULL_CHUNK, dtype=torch.uint8)
    last = []
    for i in range(FULL_WRITES - 4, FULL_WRITES):
        hit = tier.get_one(keys[i], FP, dst) is ReadResult.HIT and torch.equal(dst, payload(i))
        last.append(hit)
    tier.close()
    return {
        "results": results,
        "last_readable": last,
        "evictions": metrics.counter("evictions"),
        "write_failures": metrics.counter("failures"),
        "warnings": logs.messages,
    }


def readonly(root: str) -> dict:
    from kvport.cache import CacheEngine, load_config
    from kvport.hal.backends.torch_ref import TorchBackend
    from kvport.testing.kv import blocks_equal, nhd_kv

    logs = Collect()
    logging.getLogger("kvport.store").addHandler(logs)
    cfg = load_config(overrides={"chunk_tokens": RO_CHUNK_TOKENS, "l1_bytes": "1MiB", "l2_path": root}, environ={})
    engine = CacheEngine(cfg, "read-only-test")  # refused on a read-only directory before issue 16
    src, _ = nhd_kv(seed=1)
    dst, desc = nhd_kv()
    engine.bind(desc, TorchBackend())
    stored = list(range(3 * RO_CHUNK_TOKENS))
    found = engine.lookup(stored)
    loaded = engine.load(stored, list(range(6)), len(stored))
    same = blocks_equal(src, dst, list(range(6)), list(range(6)))
    fresh = [7] * (2 * RO_CHUNK_TOKENS)
    kept_in_l1 = engine.store(fresh, [10, 11, 12, 13])
    engine.flush(timeout=30)
    stats = engine.stats()
    engine.close()
    return {
        "lookup": found,
        "loaded": loaded,
        "bytes_equal": same,
        "stored_in_l1": kept_in_l1,
        "skipped_read_only": stats.get("skipped_local_disk_read_only", 0),
        "write_failures": stats.get("failures", 0),
        "warnings": logs.messages,
        "describe": stats["tiers"],
    }


if __name__ == "__main__":
    scenario = {"full": full, "readonly": readonly}[sys.argv[1]]
    print(json.dumps(scenario(sys.argv[2])))
