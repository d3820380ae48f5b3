"""kill -9 during a store (real subprocess): no partial chunk is ever visible, every visible chunk validates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvport.cache import CacheEngine, load_config
from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import SUFFIX, TMP_PREFIX, LocalDiskTier
from kvport.testing.kv import nhd_kv

HELPER = Path(__file__).parent / "crash_writer.py"
ROOT = Path(__file__).resolve().parents[2]


def start(mode: str, l2: Path, marker: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(HELPER), mode, str(l2), str(marker)], env=env)


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"writer exited early with {proc.returncode}"
        assert time.time() < deadline, "writer never reached its marker"
        time.sleep(0.01)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def engine_for(l2: Path) -> CacheEngine:
    cfg = load_config(overrides={"chunk_tokens": 64, "l1_bytes": "64MiB", "l2_path": str(l2)}, environ={})
    engine = CacheEngine(cfg, "crash-test")
    _, desc = nhd_kv(num_blocks=64, block_size=16, layers=4, heads=8, head_dim=64)
    engine.bind(desc)
    return engine


def test_kill_mid_write_leaves_no_visible_chunk(tmp_path):
    l2, marker = tmp_path / "l2", tmp_path / "marker"
    proc = start("stall", l2, marker)
    wait_for(marker, proc)
    kill9(proc)
    temps = [p for p in l2.rglob(f"{TMP_PREFIX}*")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the half-written file exists...
    assert not list(l2.rglob(f"*{SUFFIX}"))  # ...but no chunk is visible
    engine = engine_for(l2)
    assert engine.lookup(list(range(64))) == 0
    assert engine.load(list(range(64)), [0, 1, 2, 3], 64) == 0
    # the dead writer's temp file is debris: reclaimed by the tier's start-up pass, without waiting for it to age
    engine.chunks.tiers[0].ready.result(timeout=30)
    assert not temps[0].exists()
    engine.close()


def test_kill_during_store_loop_every_visible_chunk_is_whole(tmp_path):
    l2, marker = tmp_path / "l2", tmp_path / "marker"
    proc = start("loop", l2, marker)
    wait_for(marker, proc)
    time.sleep(0.3)
    kill9(proc)
    chunks = list(l2.rglob(f"*{SUFFIX}"))
    assert len(chunks) >= 3
    src, desc = nhd_kv(num_blocks=64, block_size=16, layers=4, heads=8, head_dim=64, seed=1)
    tier = LocalDiskTier(l2, 1 << 40)
    buf = torch.empty(desc.canonical_bytes(64), dtype=torch.uint8)
    for path in chunks:
        assert tier.get_one(path.name[: -len(SUFFIX)], desc.fingerprint, buf) is ReadResult.HIT
    # and loads of every stored prefix give exactly the stored bytes
    engine = engine_for(l2)
    dst = engine.descriptor.streams[0].buffer
    for n in range(3):
        tokens = [n] * 64 * 4
        assert engine.load(tokens, list(range(16)), len(tokens)) == 256
        assert torch.equal(dst[:, :16], src[0][:, :16])
    engine.close()
