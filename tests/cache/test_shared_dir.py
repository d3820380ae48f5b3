"""Two real processes sharing one disk L2 directory: each reads the other's chunks intact, concurrent writes of the
same key are safe, and a shared capacity bound holds while both write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import HEADER_BYTES, SUFFIX, LocalDiskTier
from kvport.testing.kv import nhd_kv

HELPER = Path(__file__).parent / "shared_worker.py"
ROOT = Path(__file__).resolve().parents[2]
SEQS, CHUNKS_PER_SEQ = 12, 4


def run_pair(tmp_path: Path, l2_bytes: str) -> list[dict]:
    l2 = tmp_path / "l2"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), str(me), str(l2), l2_bytes, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"worker failed ({proc.returncode}): {out}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_read_each_others_chunks(tmp_path):
    results = run_pair(tmp_path, "1GiB")
    full = 2 * SEQS * CHUNKS_PER_SEQ * 32  # peer's sequences + the shared ones, all whole
    for res in results:
        assert res == {"loaded": full, "bad": 0, "failures": 0}
    files = list((tmp_path / "l2").rglob(f"*{SUFFIX}"))
    assert len(files) == 3 * SEQS * CHUNKS_PER_SEQ  # shared keys stored once, not twice


def test_shared_capacity_bound_holds_and_survivors_validate(tmp_path):
    _, desc = nhd_kv(num_blocks=8)
    chunk_file = HEADER_BYTES + desc.canonical_bytes(32)
    capacity = 40 * chunk_file  # well under the 144 chunks the two processes write
    results = run_pair(tmp_path, str(capacity))
    for res in results:
        assert res["bad"] == 0  # evicted chunks are misses, never wrong bytes
    tier = LocalDiskTier(tmp_path / "l2", capacity)
    # each process may overshoot by what the other wrote since its last scan (10% of capacity) plus in-flight
    assert tier.usage() <= capacity * 1.25
    buf = torch.empty(desc.canonical_bytes(32), dtype=torch.uint8)
    for path in (tmp_path / "l2").rglob(f"*{SUFFIX}"):
        assert tier.get_one(path.name[: -len(SUFFIX)], desc.fingerprint, buf) is ReadResult.HIT
