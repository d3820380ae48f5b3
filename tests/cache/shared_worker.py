"""Subprocess helper for test_shared_dir: one of two processes sharing a disk L2 directory.
Stores its own sequences plus a shared one (same keys as the peer), waits for the peer, then loads and checks the
peer's sequences byte for byte. Prints a JSON summary; exits 1 on any mismatch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from kvport.cache import CacheEngine, load_config
from kvport.testing.kv import nhd_kv

C = 32
SEQS = 12


def sequence(owner: int, i: int) -> list[int]:
    return [owner * 100_000 + i * 1000 + t for t in range(C * 4)]


def main() -> int:
    me, l2_path, l2_bytes, sync_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    peer = 1 - me
    overrides = {"chunk_tokens": C, "l1_bytes": "4MiB", "l2_path": l2_path, "l2_bytes": l2_bytes}
    cfg = load_config(overrides=overrides, environ={})
    src, desc = nhd_kv(num_blocks=8, seed=42)  # same seed in both: same KV for the same tokens
    engine = CacheEngine(cfg, "shared-test")
    engine.bind(desc)
    for i in range(SEQS):
        engine.store(sequence(me, i), list(range(8)))
        engine.store(sequence(9, i), list(range(8)))  # both processes race on the same keys
    engine.flush()
    (sync_dir / f"done{me}").write_text("1")
    deadline = time.time() + 120
    while not (sync_dir / f"done{peer}").exists():
        if time.time() > deadline:
            return 2
        time.sleep(0.01)
    dst, ddesc = nhd_kv(num_blocks=8)
    reader = CacheEngine(load_config(overrides=overrides | {"prefetch": me == 0}, environ={}), "shared-test")
    reader.bind(ddesc)
    loaded, bad = 0, 0
    for owner in (peer, 9):
        for i in range(SEQS):
            for t in dst:
                t.zero_()
            tokens = sequence(owner, i)
            n = reader.load(tokens, list(range(8)), len(tokens))
            loaded += n
            blocks = n // 16
            if any(not torch.equal(a[:, :blocks], b[:, :blocks]) for a, b in zip(src, dst)):
                bad += 1
    stats = reader.stats()
    print(json.dumps({"loaded": loaded, "bad": bad, "failures": stats["failures"]}))
    engine.close()
    reader.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
