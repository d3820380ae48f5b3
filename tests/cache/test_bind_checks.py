"""Configs checked at CacheEngine.bind against what the machine and the layout allow, before anything is allocated:
L1 beyond memory, a disk tier beyond its filesystem, a chunk larger than a tier, an allocation the OS refuses. Every
refusal is one UserError line, never a RuntimeError or TypeError out of an allocator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvport.cache import CacheEngine, load_config
from kvport.cache.config import check_machine_limits
from kvport.errors import UserError
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.machine import available_memory, disk_space
from kvport.store.tiers.local_disk import HEADER_BYTES
from kvport.testing.kv import nhd_kv

ROOT = Path(__file__).resolve().parents[2]
C = 32  # chunk tokens; nhd_kv's default layout makes a 4096-byte chunk of 32 tokens


def engine_for(**overrides) -> CacheEngine:
    return CacheEngine(load_config(overrides={"chunk_tokens": C, "l1_bytes": "1MiB"} | overrides, environ={}), "bind")


def test_l1_beyond_the_machines_memory_is_refused_before_allocating():
    engine = engine_for(l1_bytes="1000TiB")  # before: a RuntimeError from the allocator
    with pytest.raises(UserError, match=r"^cache config: l1_bytes=1000 TiB is more than this machine's memory \("):
        engine.bind(nhd_kv()[1], TorchBackend())
    assert engine.l1 is None and engine.mover is None
    engine.close()


def test_a_chunk_larger_than_the_disk_tier_is_refused(tmp_path):
    _, desc = nhd_kv()
    chunk_file = HEADER_BYTES + desc.canonical_bytes(C)
    too_small = [
        {"l2_path": str(tmp_path / "a"), "l2_bytes": desc.canonical_bytes(C)},  # the payload fits, the header not
        {"tiers": [{"type": "local_disk", "path": str(tmp_path / "b"), "bytes": 1000}]},
    ]
    for overrides in too_small:  # before: accepted; every write then evicted everything, the new chunk included
        engine = engine_for(**overrides)
        with pytest.raises(UserError, match=rf"^cache config: local_disk tier .* than one chunk file \({chunk_file}"):
            engine.bind(desc, TorchBackend())
        assert engine.l1 is None
        engine.close()
    with engine_for(l2_path=str(tmp_path / "c"), l2_bytes=chunk_file) as engine:
        engine.bind(desc, TorchBackend())
        assert engine.store(list(range(C)), [0, 1]) == C


def test_a_disk_tier_beyond_its_filesystem_is_refused_at_bind_in_either_spelling(tmp_path):
    fs = disk_space(tmp_path).total
    spellings = [
        ({"l2_path": str(tmp_path / "a"), "l2_bytes": fs + 1}, r"l2_bytes=.* is more than the filesystem of l2_path"),
        ({"tiers": [{"type": "local_disk", "path": str(tmp_path / "b"), "bytes": fs + 1}]},
         r"tiers\[0\] bytes=.* is more than the filesystem of .*/b \("),
    ]  # fmt: skip
    for overrides, message in spellings:
        engine = engine_for(**overrides)
        with pytest.raises(UserError, match="^cache config: " + message):
            engine.bind(nhd_kv()[1], TorchBackend())
        with pytest.raises(UserError, match="^cache config: " + message):
            check_machine_limits(engine.config)  # what `kvport config check` runs
        engine.close()


def test_an_allocation_the_os_refuses_is_one_line(tmp_path):
    # A limit no machine check sees (ulimit -v): the allocator's RuntimeError becomes a UserError naming l1_bytes.
    free = available_memory()
    if free is not None and free < 2 << 30:
        pytest.skip("needs 1 GiB of L1 to pass the memory check first")
    script = textwrap.dedent(
        """
        import resource
        from kvport.cache import CacheEngine, load_config
        from kvport.errors import UserError
        from kvport.hal.backends.torch_ref import TorchBackend
        from kvport.testing.kv import nhd_kv

        resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))  # 1.5 GiB of address space; imports take ~0.65
        engine = CacheEngine(load_config(overrides={"chunk_tokens": 32, "l1_bytes": "1GiB"}, environ={}), "limit")
        try:
            engine.bind(nhd_kv()[1], TorchBackend())
        except UserError as exc:
            print("UserError:", exc)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("UserError: cache config: l1_bytes=1073741824 cannot be allocated (") and "\n" not in line
