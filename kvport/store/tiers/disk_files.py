"""File primitives of the local-disk tier: access modes, directory creation, the writer lock that marks a temp file as
live, the debris test for temp files of dead writers, and a rate-limited warning. Must not know chunks or capacity.

A writer holds an exclusive ``flock`` on its temp file from creation until the file is renamed or unlinked; the kernel
drops that lock when the writer's process dies, whatever killed it. So a temp file whose lock can be taken has no
writer: it is debris, reclaimable at once (no waiting for it to age), in any process and, on filesystems whose flock
reaches every sharer (local disks, NFSv4), on any host. Where a filesystem has no flock the age rule remains."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

SUFFIX = ".kvc"  # a chunk file: <root>/<key[:2]>/<key>.kvc
TMP_PREFIX = ".tmp."  # then <key>.<pid>.<random>: the pid is for people reading the directory; liveness is the lock
# A writer creates its file under this prefix, locks it, then renames it to TMP_PREFIX: a scanner only ever sees temp
# files that were locked from birth (a scan between a plain create and the lock once took a live writer's file).
# Files left under this prefix (a writer killed in that instant) are removed by age, like lock-less filesystems'.
NEW_PREFIX = ".new."

# access option -> (file mode, directory mode). Private: chunks are KV derived from users' prompts, so only the
# owner reads them. Group: a cache shared by the accounts of one group; the directory's setgid bit makes new files
# inherit the group, and group write lets every sharer evict, delete corrupt chunks and refresh recency (utime).
ACCESS_MODES = {"private": (0o600, 0o700), "group": (0o660, 0o2770)}
# Fallback only, for filesystems without flock: a temp file this old belongs to a writer that died. A live write of one
# chunk takes well under a second on the 0.3 GB/s disk measured on the dev VM, so an hour leaves no doubt.
STALE_TMP_S = 3600.0
# errnos of a filesystem that cannot lock files (then liveness falls back to the age rule).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def make_dirs(path: Path, mode: int) -> None:
    """``mkdir -p`` where every directory created gets ``mode`` exactly (Path.mkdir leaves parents at the umask's
    default and applies the umask to ``mode``: a group mode would lose its group bits)."""
    missing = []
    here = path
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # created meanwhile by another writer
        os.chmod(directory, mode)


def hold_writer_lock(fd: int) -> None:
    """Mark the temp file ``fd`` as written by a live process (the lock lives as long as the descriptor). Raises
    FileNotFoundError when a scanner judged the file debris in the instant between its creation and the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        return  # no locks on this filesystem: the temp file is judged by its age
    if os.fstat(fd).st_nlink == 0:
        raise FileNotFoundError(errno.ENOENT, "temp file reclaimed before it was locked")


def reclaim_if_debris(path: str, mtime: float, now: float) -> bool:
    """Delete the temp file ``path`` if no live writer holds it; True if it was debris (now gone or going)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True  # renamed or removed meanwhile: not ours to count
    except OSError:
        return _reclaim_if_old(path, mtime, now)  # another account's file we cannot open: by age only
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                return False
            return _reclaim_if_old(path, mtime, now)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file we locked, not a new one by that name
                os.unlink(path)
        except OSError:
            pass  # gone already, or a read-only directory: either way it is not a live chunk
        return True
    finally:
        os.close(fd)


def _reclaim_if_old(path: str, mtime: float, now: float) -> bool:
    if now - mtime <= STALE_TMP_S:
        return False
    try:
        os.unlink(path)
    except OSError:
        pass
    return True


class RateLimitedWarning:
    """One warning per ``interval_s`` per instance; the next one says how many events were folded into it."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._folded = 0

    def warn(self, message: str, *args: object) -> bool:
        """Log ``message % args`` unless one was logged less than ``interval_s`` ago; True if logged."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._folded += 1
                return False
            folded, self._folded, self._last = self._folded, 0, now
        suffix = f" ({folded} more since the last such warning)" if folded else ""
        self._log.warning(message + suffix, *args)
        return True


def unlink_quietly(path: str | os.PathLike) -> None:
    """Remove ``path``; already gone (another process reclaimed or evicted it) is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
