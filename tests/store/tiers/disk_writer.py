"""Subprocess helper for test_local_disk_faults: a real process writing chunks into a disk tier, stopped at a known
point. 'stall ROOT MARKERS N BYTES': N writer threads each write a whole chunk into its temp file, touch
MARKERS/<pid>.<i> and hang there (the parent kills the process with -9: N temp files of a dead writer).
'hold ROOT MARKER GO BYTES KEY': writes KEY's temp file, touches MARKER, waits for the file GO, then finishes and
prints put_one's result as JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from kvport.store.keys import chunk_keys
from kvport.store.tiers import local_disk

FP = "fault-test"
real_write_all = local_disk.write_all


def payload(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def stall(root: str, markers: str, count: int, nbytes: int) -> None:
    calls = iter(range(count))

    def write_then_hang(fd, buffers):
        real_write_all(fd, buffers)
        Path(markers, f"{os.getpid()}.{next(calls)}").write_text("written, not linked")
        time.sleep(3600)

    local_disk.write_all = write_then_hang
    tier = local_disk.LocalDiskTier(root, 1 << 40, write_threads=count)
    keys = chunk_keys(list(range(count)), 1, f"debris-{os.getpid()}")
    tier.put(keys, FP, [payload(nbytes, i) for i in range(count)])
    time.sleep(3600)


def hold(root: str, marker: str, go: str, nbytes: int, key: str) -> None:
    def write_then_wait(fd, buffers):
        real_write_all(fd, buffers)
        Path(marker).write_text("written, not linked")
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)

    local_disk.write_all = write_then_wait
    tier = local_disk.LocalDiskTier(root, 1 << 40)
    print(json.dumps({"result": tier.put_one(key, FP, payload(nbytes, 0))}))


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "stall":
        stall(args[0], args[1], int(args[2]), int(args[3]))
    else:
        hold(args[0], args[1], args[2], int(args[3]), args[4])
