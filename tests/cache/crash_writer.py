"""Subprocess helper for test_crash_safety: stores chunks into a disk L2 until killed.
Mode 'stall' stops halfway through writing one chunk file (after a marker file appears) so the parent can
kill -9 it at a known point; mode 'loop' stores continuously so the kill lands wherever it lands."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kvport.cache import CacheEngine, load_config
from kvport.store.tiers import local_disk
from kvport.testing.kv import nhd_kv


def main() -> None:
    mode, l2_path, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cfg = load_config(overrides={"chunk_tokens": 64, "l1_bytes": "64MiB", "l2_path": l2_path}, environ={})
    _, desc = nhd_kv(num_blocks=64, block_size=16, layers=4, heads=8, head_dim=64, seed=1)
    engine = CacheEngine(cfg, "crash-test")
    engine.bind(desc)
    if mode == "stall":
        real_write_all = local_disk.write_all

        def half_then_stall(fd, buffers):
            header, body = buffers
            real_write_all(fd, [header, body[: len(body) // 2]])
            marker.write_text("mid-write")
            time.sleep(3600)

        local_disk.write_all = half_then_stall
        engine.store(list(range(64)), [0, 1, 2, 3])
        time.sleep(3600)
    n = 0
    while True:
        tokens = [n] * 64 * 4
        engine.store(tokens, list(range(16)))
        n += 1
        if n == 3:
            marker.write_text("running")


if __name__ == "__main__":
    main()
