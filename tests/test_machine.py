"""kvport.machine against the OS's own figures: /proc/meminfo, statvfs, cgroup limits."""

from __future__ import annotations

import os
from pathlib import Path

from kvport.machine import available_memory, disk_space, total_memory


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_memory_is_physical_ram_capped_by_a_cgroup_limit():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(physical - _meminfo_kib("MemTotal") * 1024) < 1 << 30  # the same RAM, two ways
    limits = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]  # v2, v1
    texts = [p.read_text().strip() for p in limits if p.exists()]
    caps = [int(t) for t in texts if t.isdigit() and int(t) < 1 << 60]  # "max" / a huge v1 number: no limit
    assert total_memory() == min([physical, *caps[:1]])
    free = available_memory()
    assert 0 < free <= total_memory()
    assert abs(free - min(_meminfo_kib("MemAvailable") * 1024, total_memory())) < 256 << 20  # moves while we look


def test_disk_space_of_a_directory_not_created_yet_is_its_parents(tmp_path):
    st = os.statvfs(tmp_path)
    space = disk_space(tmp_path / "not" / "yet")
    assert space.total == st.f_blocks * st.f_frsize
    assert abs(space.free - st.f_bavail * st.f_frsize) < 64 << 20
    home = disk_space("~")
    assert home is not None and home.total == disk_space(os.path.expanduser("~")).total
