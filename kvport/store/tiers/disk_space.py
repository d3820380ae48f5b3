"""What a local-disk tier's directory holds and how it stays under capacity: the scan (chunk files and live
writers' temp files; debris reclaimed), least-recently-used eviction under the cross-process lock, and the namespace
name files behind `kvport cache list`. Must not read or write chunk payloads."""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path

from kvport.store.envelope import HEADER_BYTES, NO_NAMESPACE, namespace_digest, recorded_namespace
from kvport.store.tiers.disk_files import (
    NEW_PREFIX,
    STALE_TMP_S,
    SUFFIX,
    TMP_PREFIX,
    reclaim_if_debris,
    unlink_quietly,
)

# Evict down to this fraction of capacity, so one eviction pass (a directory scan) covers many stores.
LOW_WATERMARK = 0.9
# Namespace digest -> name files (for `kvport cache list`); chunk files record only the digest.
NAMES_DIR = ".namespaces"


def scan(root: Path, read_only: bool) -> list[tuple[float, int, Path]]:
    """(mtime, size, path) of every chunk and live writer's temp file. A temp file no live writer holds is debris
    (its writer died): deleted here (unless ``read_only``), so it neither counts toward capacity nor waits to age."""
    now = time.time()
    found = []
    try:
        subs = list(os.scandir(root))
    except FileNotFoundError:
        return found
    for sub in subs:
        if not sub.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(sub.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(TMP_PREFIX):
                if read_only or reclaim_if_debris(entry.path, st.st_mtime, now):
                    continue
            elif entry.name.startswith(NEW_PREFIX):
                if not read_only and now - st.st_mtime > STALE_TMP_S:
                    unlink_quietly(entry.path)
                continue
            elif not entry.name.endswith(SUFFIX):
                continue
            found.append((st.st_mtime, st.st_size, Path(entry.path)))
    return found


def evict_lru(root: Path, file_mode: int, capacity: int, free_bytes: int) -> tuple[int, int | None]:
    """Rescan ``root`` and, over ``capacity``, delete least recently used chunks down to the low watermark; with
    ``free_bytes`` (the device is full below capacity) at least that much and a tenth of the usage. Only one process
    evicts at a time (advisory lock on ``.evict.lock``). Returns (chunks evicted, bytes in use afterwards), the bytes
    None when another process holds the lock (nothing learned) and 0 when the directory cannot be locked at all."""
    try:
        lock_fd = os.open(root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode)
    except OSError:  # the directory was removed (nothing to evict) or cannot be written now
        return 0, 0
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, None
        entries = scan(root, read_only=False)
        total = sum(size for _, size, _ in entries)
        if free_bytes:
            target = total - max(free_bytes, (1 - LOW_WATERMARK) * min(total, capacity))
        else:
            target = LOW_WATERMARK * capacity if total > capacity else total
        evicted = 0
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= target:
                break
            if path.name.startswith(TMP_PREFIX):
                continue  # a live writer's file (dead writers' ones were reclaimed by the scan)
            unlink_quietly(path)  # already gone: evicted or replaced by the other process
            total -= size
            evicted += 1
        return evicted, total
    finally:
        os.close(lock_fd)


def record_namespace(root: Path, namespace: str) -> None:
    """Record ``namespace``'s name under its digest once (temp name then rename), for listings."""
    names = root / NAMES_DIR
    path = names / (namespace_digest(namespace).hex() + ".json")
    if path.exists():
        return
    try:
        names.mkdir(exist_ok=True)
        # NEW_PREFIX, not TMP_PREFIX: a debris scan would take an unlocked .tmp. file for a dead writer's.
        tmp = names / f"{NEW_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps({"namespace": namespace}))
        os.rename(tmp, path)
    except OSError:
        pass  # a listing then shows the digest only; storing chunks is unaffected


def namespace_names(root: Path) -> dict[bytes, str]:
    """Namespace digest -> name, from the name files (chunks stored without a namespace: the empty name)."""
    out = {NO_NAMESPACE: ""}
    try:
        entries = list(os.scandir(root / NAMES_DIR))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        try:
            out[bytes.fromhex(entry.name[: -len(".json")])] = json.loads(Path(entry.path).read_text())["namespace"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged name file: the listing shows the digest
    return out


def chunks_by_namespace(entries: list[tuple[float, int, Path]]):
    """(namespace digest, size, path) of every chunk file among ``entries`` (a scan) whose header parses."""
    for _, size, path in entries:
        if path.name.startswith(TMP_PREFIX):
            continue
        try:
            with open(path, "rb") as f:
                digest = recorded_namespace(f.read(HEADER_BYTES))
        except OSError:
            continue
        if digest is not None:
            yield digest, size, path
