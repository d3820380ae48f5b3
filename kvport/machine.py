"""What this machine can hold: its memory (physical, capped by a cgroup limit), memory available now, a filesystem's
free space. Owns reading them from the OS; must not decide what is too much (callers compare and word the error)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def total_memory() -> int | None:
    """Bytes of memory this process may use at most: physical RAM, or a smaller cgroup limit; None if unknown."""
    sizes = [_sysconf_bytes("SC_PHYS_PAGES"), _meminfo("MemTotal")]
    physical = next((s for s in sizes if s), None)
    limit = _cgroup_limit()
    if physical is None:
        return limit
    return min(physical, limit) if limit else physical


def available_memory() -> int | None:
    """Bytes that can be allocated now without swapping (MemAvailable), capped by total_memory; None if unknown."""
    free = _meminfo("MemAvailable") or _sysconf_bytes("SC_AVPHYS_PAGES")
    total = total_memory()
    if free is None:
        return total
    return min(free, total) if total else free


class DiskSpace(NamedTuple):
    total: int  # size of the filesystem
    free: int  # what an unprivileged writer can still put there


def disk_space(path: str | os.PathLike) -> DiskSpace | None:
    """Size and free space of the filesystem of ``path`` (or of its nearest existing parent, for a directory not
    created yet); None if it cannot be read."""
    here = Path(os.path.expanduser(path)).absolute()
    for candidate in (here, *here.parents):
        try:
            st = os.statvfs(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, AttributeError):  # no statvfs (Windows), or a permission problem
            return None
        return DiskSpace(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    return None


def _sysconf_bytes(name: str) -> int | None:
    try:
        pages, size = os.sysconf(name), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0]) * 1024  # always kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit() -> int | None:
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" (v2) or a huge number (v1) means no limit
            return int(text)
    return None
