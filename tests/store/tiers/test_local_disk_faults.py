"""Faults of the disk tier with real processes, files and mounts: debris of writers killed with -9 reclaimed (at start
and by a capacity pass) without costing valid chunks, a full disk that recovers by evicting, a removed directory
re-created, a read-only directory serving reads, owner-only files, and "written" told from "already present"."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from private_mount import run_python_in_private_mount

from kvport.errors import UserError
from kvport.store.keys import chunk_keys
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers.base import ReadResult
from kvport.store.tiers.local_disk import HEADER_BYTES, TMP_PREFIX, LocalDiskTier, parse_options

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
FP = "fault-test"  # as in disk_writer.py
MiB = 1 << 20


def payload(nbytes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def spawn(*args: str, stdout=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(HERE / "disk_writer.py"), *args], env=env, stdout=stdout, text=True)


def wait_for(predicate, procs, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"writer exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def stalled_writers(root: Path, markers: Path, processes: int, per_process: int, nbytes: int) -> list:
    """``processes`` real writers, each with ``per_process`` whole chunks in temp files, hanging before the link."""
    markers.mkdir(exist_ok=True)
    procs = [spawn("stall", str(root), str(markers), str(per_process), str(nbytes)) for _ in range(processes)]
    wait_for(lambda: len(list(markers.iterdir())) == processes * per_process, procs, "the writers' temp files")
    return procs


def temp_files(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


def test_debris_of_killed_writers_never_costs_valid_chunks(tmp_path):
    # The reproduction, scaled down: writers killed during whole-chunk writes left temp files worth more than
    # the tier's capacity; they counted toward it for an hour and the tier evicted every valid chunk instead.
    root, chunk = tmp_path / "l2", MiB
    for proc in stalled_writers(root, tmp_path / "markers", processes=3, per_process=4, nbytes=chunk):
        kill9(proc)
    debris = temp_files(root)
    assert len(debris) == 12 and sum(p.stat().st_size for p in debris) == 12 * (HEADER_BYTES + chunk)
    metrics = CacheMetrics("debris")
    tier = LocalDiskTier(root, capacity_bytes=8 * (HEADER_BYTES + chunk), metrics=metrics)
    # reclaimed at start (a background pass), not after an hour
    wait_for(lambda: not temp_files(root), [], "the start-up pass to reclaim the debris", timeout=30)
    keys = chunk_keys(list(range(6)), 1, "after-the-crash")
    assert [tier.put_one(k, FP, payload(chunk, i)) for i, k in enumerate(keys)] == [True] * 6
    assert [tier.contains_one(k) for k in keys] == [True] * 6  # 6 of 6 kept (0 of 6 before)
    assert metrics.counter("evictions") == 0
    assert tier.usage() == 6 * (HEADER_BYTES + chunk)
    tier.close()


def test_a_live_writers_temp_file_is_kept_and_reclaimed_once_it_is_killed(tmp_path):
    root, chunk = tmp_path / "l2", 256 * 1024
    tier = LocalDiskTier(root, capacity_bytes=1 << 30)
    [proc] = stalled_writers(root, tmp_path / "markers", processes=1, per_process=2, nbytes=chunk)
    try:
        tier.enforce_capacity()  # the writer is alive: its files are work in progress, counted, never deleted
        assert len(temp_files(root)) == 2 and tier.usage() == 2 * (HEADER_BYTES + chunk)
    finally:
        kill9(proc)
    tier.enforce_capacity()  # the same tier, no restart: the next capacity pass finds the lock gone
    assert temp_files(root) == [] and tier.usage() == 0
    tier.close()


def test_written_is_told_from_already_written_by_another_process(tmp_path):
    # Two processes store one key at once. Before: both renamed, both returned True and both counted the bytes.
    root, chunk = tmp_path / "l2", 64 * 1024
    key = chunk_keys([1], 1, "race")[0]
    marker, go = tmp_path / "marker", tmp_path / "go"
    other = spawn("hold", str(root), str(marker), str(go), str(chunk), key, stdout=subprocess.PIPE)
    try:
        wait_for(marker.exists, [other], "the other writer's temp file")
        metrics = CacheMetrics("race")
        tier = LocalDiskTier(root, capacity_bytes=1 << 30, metrics=metrics)
        assert tier.put_one(key, FP, payload(chunk, 0)) is True  # linked first
        go.write_text("go")
        out, _ = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            kill9(other)
    assert json.loads(out) == {"result": None}  # the other process wrote nothing visible and counts nothing
    assert tier.put_one(key, FP, payload(chunk, 0)) is None
    assert temp_files(root) == [] and tier.usage() == HEADER_BYTES + chunk
    dst = torch.empty(chunk, dtype=torch.uint8)
    assert tier.get_one(key, FP, dst) is ReadResult.HIT and torch.equal(dst, payload(chunk, 0))
    tier.close()


def test_a_full_disk_evicts_then_warns_and_keeps_storing(tmp_path):
    # bytes (1 GiB) far above a 6 MiB tmpfs: before, every write after the disk filled failed, silently, forever.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_python_in_private_mount([f"mount -t tmpfs -o size=6m tmpfs {mnt}"], HERE / "disk_mounted.py", "full",
                                       str(mnt / "l2"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["results"] == [True] * 40, out["results"]  # 40 chunks of 512 KiB through a 6 MiB disk
    assert out["last_readable"] == [True] * 4
    assert out["evictions"] > 0 and out["write_failures"] == 0
    full = [m for m in out["warnings"] if "filled up" in m or "no space" in m]
    assert len(full) == 1, out["warnings"]  # logged, once a minute at most, not once per write
    assert "evicted" in full[0] and "lower bytes" in full[0]


def test_a_removed_cache_directory_is_re_created(tmp_path, caplog):
    root = tmp_path / "cache" / "l2"
    tier = LocalDiskTier(root, capacity_bytes=1 << 30, metrics=CacheMetrics("gone"))
    k1, k2 = chunk_keys([1, 2], 1, "gone")
    assert tier.put_one(k1, FP, payload(4096, 1)) is True
    tier.ready.result(timeout=30)  # the start-up pass may still be creating its lock file under root
    shutil.rmtree(tmp_path / "cache")  # e.g. a tmp cleaner
    assert tier.get_one(k1, FP, torch.empty(4096, dtype=torch.uint8)) is ReadResult.MISS
    with caplog.at_level(logging.WARNING, logger="kvport.store"):
        assert tier.put_one(k2, FP, payload(4096, 2)) is True
    assert tier.contains_one(k2) and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert "re-created" in caplog.text
    assert tier.metrics.counter("failures") == 0 and tier.usage() == HEADER_BYTES + 4096
    tier.close()


def test_a_read_only_cache_directory_serves_reads(tmp_path):
    from kvport.cache import CacheEngine, load_config
    from kvport.hal.backends.torch_ref import TorchBackend
    from kvport.testing.kv import nhd_kv

    l2 = tmp_path / "l2"
    src, desc = nhd_kv(seed=1)  # as disk_mounted.readonly
    cfg = load_config(overrides={"chunk_tokens": 32, "l1_bytes": "1MiB", "l2_path": str(l2)}, environ={})
    with CacheEngine(cfg, "read-only-test") as engine:
        engine.bind(desc, TorchBackend())
        assert engine.store(list(range(96)), list(range(6))) == 96
    before = sorted((p, p.stat().st_mtime_ns) for p in l2.rglob("*"))
    mounts = [f"mount --bind {l2} {l2}", f"mount -o remount,bind,ro {l2}"]
    proc = run_python_in_private_mount(mounts, HERE / "disk_mounted.py", "readonly", str(l2))
    assert proc.returncode == 0, proc.stderr  # before: UserError "directory is not writable" at construction
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["lookup"] == 96 and out["loaded"] == 96 and out["bytes_equal"]
    assert out["stored_in_l1"] == 64 and out["skipped_read_only"] == 2 and out["write_failures"] == 0
    assert any("read-only" in m for m in out["warnings"]) and "read-only" in out["describe"][0]
    assert sorted((p, p.stat().st_mtime_ns) for p in l2.rglob("*")) == before  # nothing written, nothing deleted


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_are_owner_only_unless_widened(tmp_path):
    key = chunk_keys([1], 1, "modes")[0]
    old_umask = os.umask(0o022)  # the common default, under which files were 0644 and directories 0755
    try:
        private = LocalDiskTier(tmp_path / "private" / "l2", capacity_bytes=1 << 30)
        assert private.put_one(key, FP, payload(4096, 1)) is True
        private.enforce_capacity()  # creates the eviction lock file
        path = private.path(key)
        made = (tmp_path / "private", private.root, path.parent, path, private.root / ".evict.lock")
        assert [_mode(p) for p in made] == [0o700, 0o700, 0o700, 0o600, 0o600]
        spec = {"type": "local_disk", "path": str(tmp_path / "shared"), "access": "group"}
        group = LocalDiskTier.from_spec(spec, "test")
        assert group.put_one(key, FP, payload(4096, 1)) is True
    finally:
        os.umask(old_umask)
    path = group.path(key)
    assert [_mode(group.root), _mode(path.parent), _mode(path)] == [0o2770, 0o2770, 0o660]  # despite the umask
    with pytest.raises(UserError, match=r"^test: access='world', expected one of private, group$"):
        parse_options({"type": "local_disk", "path": "/x", "access": "world"}, "test")
    private.close()
    group.close()


@pytest.mark.parametrize("bad", ["../x", "ab/cd", "A" * 64, "0" * 63, "", "0" * 64 + "/", None])
def test_every_entry_point_refuses_a_non_key(tmp_path, bad):
    tier = LocalDiskTier(tmp_path / "l2", capacity_bytes=1 << 30)
    victim = tmp_path / "x.kvc"
    victim.write_bytes(b"victim")
    calls = [
        lambda: tier.path(bad),
        lambda: tier.contains_one(bad),
        lambda: tier.get_one(bad, FP, torch.empty(6, dtype=torch.uint8)),
        lambda: tier.put_one(bad, FP, payload(6, 0)),
        lambda: tier.delete_one(bad),
        lambda: tier.contains_prefix([bad]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="not a kvport chunk key"):
            call()
    assert victim.read_bytes() == b"victim"
    tier.close()
