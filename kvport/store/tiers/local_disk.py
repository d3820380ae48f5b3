"""The local-disk tier: one file per chunk, written to a temporary name then linked into place, validated on every
read. Owns the on-disk layout, capacity, recovery from a full disk or a removed directory, and cross-process safety;
must not cache chunk contents in memory."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvport.errors import UserError
from kvport.store.envelope import (
    HEADER_BYTES,
    Header,
    checksum,
    open_header,
    seal_header,
)
from kvport.store.tiers.base import NamespaceUsage, ReadResult, ThreadedTier, check_keys, options_from
from kvport.store.tiers.disk_files import (
    ACCESS_MODES,
    NEW_PREFIX,
    STALE_TMP_S,
    SUFFIX,
    TMP_PREFIX,
    RateLimitedWarning,
    hold_writer_lock,
    make_dirs,
    unlink_quietly,
)
from kvport.store.tiers.disk_space import (
    chunks_by_namespace,
    evict_lru,
    namespace_names,
    record_namespace,
    scan,
)

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

_log = logging.getLogger("kvport.store")

# Rescan the directory after this fraction of capacity was written by this process, to see other writers.
RESCAN_FRACTION = 0.1
# Seconds between two warnings of one kind: a full disk fails every write, one line a minute says so without flooding.
WARN_INTERVAL_S = 60.0
OPTIONS = ("path", "bytes", "fsync", "read_threads", "write_threads", "access")
# link() errnos of filesystems without hard links (FAT, some FUSE and object-store mounts): the tier renames instead.
_NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
__all__ = ["HEADER_BYTES", "STALE_TMP_S", "SUFFIX", "TMP_PREFIX", "LocalDiskTier", "parse_options", "write_all"]


def _as_bytes_view(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tier buffers must be contiguous CPU tensors")
    return memoryview(tensor.numpy()).cast("B")


def parse_options(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked options of a ``{type: local_disk, path: ..., bytes: ..., fsync: ..., access: ...}`` spec (no disk is
    touched). ``access: private`` (default) creates files 0600 and directories 0700; ``access: group`` 0660 and 2770,
    for a cache shared by the accounts of one group."""
    from kvport.cache.config import coerce_bool, coerce_positive_int, parse_bytes

    opts = options_from(spec, OPTIONS, where)
    if not opts.get("path"):
        raise UserError(f"{where}: 'path' is required (the cache directory)")
    out: dict[str, Any] = {"path": os.path.expanduser(str(opts["path"]))}
    out["bytes"] = parse_bytes(opts.get("bytes", "64GiB"), f"{where}: bytes")
    if out["bytes"] <= 0:
        raise UserError(f"{where}: bytes={out['bytes']}, expected a positive byte count")
    out["fsync"] = coerce_bool(opts.get("fsync", False), f"{where}: fsync")
    out["read_threads"] = coerce_positive_int(opts.get("read_threads", 2), f"{where}: read_threads")
    out["write_threads"] = coerce_positive_int(opts.get("write_threads", 2), f"{where}: write_threads")
    out["access"] = str(opts.get("access", "private"))
    if out["access"] not in ACCESS_MODES:
        raise UserError(f"{where}: access={opts['access']!r}, expected one of {', '.join(ACCESS_MODES)}")
    return out


class LocalDiskTier(ThreadedTier):
    """Chunks under ``root/<key[:2]>/<key>.kvc``. Two processes may share ``root``: links and renames are atomic,
    readers validate everything, evictions and corrupt-chunk deletions tolerate the other process doing the same.
    A read-only ``root`` serves its chunks and stores none; a removed one is re-created by the next write."""

    kind = "local_disk"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> LocalDiskTier:
        o = parse_options(spec, where)
        return cls(o["path"], o["bytes"], o["fsync"], metrics, o["read_threads"], o["write_threads"], o["access"])

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        fsync: bool = False,
        metrics: CacheMetrics | None = None,
        read_threads: int = 2,
        write_threads: int = 2,
        access: str = "private",
    ) -> None:
        self.root = Path(root)
        self.access = access
        self.file_mode, self.dir_mode = ACCESS_MODES[access]
        try:
            make_dirs(self.root, self.dir_mode)
        except OSError as exc:
            raise UserError(f"local_disk tier {self.root}: cannot create directory ({exc.strerror})") from None
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise UserError(f"local_disk tier {self.root}: directory is not readable")
        # A read-only directory (a read-only mount, a cache another account prepared) still serves its chunks.
        self.read_only = not os.access(self.root, os.W_OK | os.X_OK)
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.metrics = metrics
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes on disk as of the last scan plus our writes since; None = not scanned
        self._written_since_scan = 0
        self._warn_full = RateLimitedWarning(_log, WARN_INTERVAL_S)
        self._warn_gone = RateLimitedWarning(_log, WARN_INTERVAL_S)
        self._warn_error = RateLimitedWarning(_log, WARN_INTERVAL_S)
        super().__init__(read_threads, write_threads)
        # The start-up pass: temp files of dead writers reclaimed and the usage learned, in the background (a large
        # directory takes a while to scan and lookups need none of it). ``ready`` says when it finished.
        self.ready: cf.Future = cf.Future()
        if self.read_only:
            _log.warning("kvport: local_disk tier %s is read-only: serving its chunks, storing none", self.root)
            self.ready.set_result(0)
        else:
            self.ready = self._writers.submit(self.enforce_capacity)

    def describe(self) -> str:
        return f"local_disk {self.root} ({self.capacity / 2**30:.1f} GiB{', read-only' if self.read_only else ''})"

    def stats(self) -> dict[str, Any]:
        entries = self._scan()
        return {"bytes": sum(size for _, size, _ in entries), "capacity_bytes": self.capacity, "chunks": len(entries)}

    def check_chunk(self, chunk_bytes: int) -> None:
        need = HEADER_BYTES + chunk_bytes
        if need > self.capacity:
            raise UserError(
                f"cache config: local_disk tier {self.root} holds {self.capacity} bytes, less than one chunk file "
                f"({need} bytes); raise its bytes (l2_bytes) or lower chunk_tokens"
            )

    # ---- paths -------------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The chunk file of ``key``; ValueError for anything but a chunk key (every entry point comes through here,
        so no caller can name a file outside the cache: '../x', 'a/b')."""
        check_keys((key,))
        return self.root / key[:2] / (key + SUFFIX)

    # ---- reads -------------------------------------------------------------------------------------------
    def contains_one(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def get_one(self, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return ReadResult.MISS
        except OSError:
            return self._fail(ReadResult.IO_ERROR, path, None)
        try:
            return self._read_validated(fd, path, key, fingerprint, dst)
        except OSError:
            return self._fail(ReadResult.IO_ERROR, path, None)
        finally:
            os.close(fd)

    def _read_validated(self, fd: int, path: Path, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult:
        size = os.fstat(fd).st_size
        header = open_header(os.pread(fd, HEADER_BYTES, 0), key, fingerprint)
        if header is ReadResult.WRONG_FINGERPRINT:
            # Another layout's valid chunk (a reader with a different layout must never delete a writer's chunk).
            return self._count(ReadResult.WRONG_FINGERPRINT)
        if not isinstance(header, Header):
            return self._fail(header, path, fd)
        payload_len = header.payload_len
        if size < HEADER_BYTES + payload_len:
            return self._fail(ReadResult.TRUNCATED, path, fd)
        if size != HEADER_BYTES + payload_len or payload_len != dst.numel():
            return self._fail(ReadResult.CORRUPT, path, fd)
        view = _as_bytes_view(dst)
        done = 0
        while done < payload_len:
            n = os.preadv(fd, [view[done:]], HEADER_BYTES + done)
            if n == 0:  # shrank under us: only possible if someone truncated the file in place
                return self._fail(ReadResult.TRUNCATED, path, fd)
            done += n
        if checksum(view) != header.checksum:
            return self._fail(ReadResult.CORRUPT, path, fd)
        try:
            os.utime(fd)  # mtime = last use, so eviction drops the least recently used chunks
        except OSError:
            pass  # read-only media: recency is lost, correctness is not
        return ReadResult.HIT

    def _count(self, result: ReadResult) -> ReadResult:
        if self.metrics is not None:
            self.metrics.inc("failures", tier=self.kind, reason=result.value)
        return result

    def _fail(self, result: ReadResult, path: Path, fd: int | None) -> ReadResult:
        """Delete a bad chunk so nobody reads it again; only if the path still names the file we judged."""
        self._count(result)
        if fd is None:
            return result
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except OSError:
            pass  # already gone (another process deleted or replaced it)
        return result

    # ---- writes ------------------------------------------------------------------------------------------
    def put_one(self, key: str, fingerprint: str, src: torch.Tensor) -> bool | None:
        """True: written now by this call. None: already present (stored before, or by another writer that linked it
        first while we wrote): nothing written, no bytes counted. False: not stored (read-only directory, disk
        still full after eviction, I/O error), counted and logged."""
        path = self.path(key)
        if os.path.exists(path):
            return None  # same key = same tokens and namespace: content is the same; nothing written
        if self.read_only:
            self._inc("skipped", reason="read_only")
            return False
        payload = _as_bytes_view(src)
        buffers = [memoryview(seal_header(key, fingerprint, payload, namespace=self.namespace)), payload]
        nbytes = HEADER_BYTES + len(payload)
        stored = self._write_recovering(path, key, buffers)
        if stored:
            self._account(nbytes)
        return stored

    def _write(self, path: Path, key: str, buffers: list[memoryview]) -> bool | None:
        """Write a locked temp file and link it into place: True, or None when the chunk appeared meanwhile (the
        copy already there stays: same key, same bytes). The temp file is gone when this returns or raises."""
        name = f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp, new = str(path.parent / f"{TMP_PREFIX}{name}"), str(path.parent / f"{NEW_PREFIX}{name}")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
        try:
            try:
                hold_writer_lock(fd)  # held until close, after the temp name is unlinked: a live write is never debris
                os.rename(new, tmp)  # visible to scanners only now, locked
                if self.access != "private":
                    os.fchmod(fd, self.file_mode)  # the umask may have taken the group bits
                write_all(fd, buffers)
                if self.fsync:
                    os.fsync(fd)
                return self._publish(tmp, path)
            finally:
                unlink_quietly(tmp)
                unlink_quietly(new)
        finally:
            os.close(fd)

    def _publish(self, tmp: str, path: Path) -> bool | None:
        try:
            os.link(tmp, path)  # atomic and never replaces: tells "written now" from "another writer's copy won"
        except FileExistsError:
            return None
        except OSError as exc:
            if exc.errno not in _NO_HARDLINKS:
                raise
            if os.path.exists(path):
                return None
            os.rename(tmp, path)  # no hard links here: rename (atomic; a racing writer's identical copy may win)
        if self.fsync:
            _fsync_dir(path.parent)
        return True

    def _write_recovering(self, path: Path, key: str, buffers: list[memoryview]) -> bool | None:
        """``_write``, remedying what the tier can: a missing directory (first chunk of a subdirectory, or the cache
        directory removed) is created, a full disk is answered once by evicting least recently used chunks, then
        the write is tried again. A failure left over is counted and logged (rate-limited): False."""
        nbytes = sum(len(b) for b in buffers)
        evicted: int | None = None  # chunks evicted for space; None while the disk was not found full
        for attempt in range(3):
            try:
                if attempt:
                    self._ensure_dir(path.parent)
                stored = self._write(path, key, buffers)
            except OSError as exc:
                error = exc
                if exc.errno in _DISK_FULL and evicted is None:
                    evicted = self._evict(free_bytes=nbytes)
                    continue
                if exc.errno == errno.ENOENT and attempt == 0:
                    continue
                break
            if evicted is not None:
                self._warn_full.warn(
                    "kvport: local_disk tier %s: the device filled up below bytes=%d; evicted %d least recently "
                    "used chunks to make room (lower bytes / l2_bytes to what the device holds)",
                    self.root, self.capacity, evicted,
                )  # fmt: skip
            return stored
        if evicted is not None and error.errno in _DISK_FULL:
            self._warn_full.warn(
                "kvport: local_disk tier %s: no space left on the device; evicted %d chunks and it is still full: "
                "chunks are not stored (free space there or lower bytes / l2_bytes=%d)",
                self.root, evicted, self.capacity,
            )  # fmt: skip
            return self._write_failed(error, warn=False)
        return self._write_failed(error)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        root_gone = not self.root.is_dir()
        make_dirs(directory, self.dir_mode)
        if root_gone:
            self._warn_gone.warn("kvport: local_disk tier %s: the cache directory was removed; re-created it",
                                 self.root)  # fmt: skip
            with self._lock:
                self._used = None  # what we counted went with it: rescan at the next write

    def _write_failed(self, exc: OSError, warn: bool = True) -> bool:
        reason = "disk_full" if exc.errno in _DISK_FULL else "read_only" if exc.errno == errno.EROFS else "io_error"
        self._inc("failures", reason=f"write_{reason}")
        if warn:
            self._warn_error.warn("kvport: local_disk tier %s: a chunk write failed: %s", self.root, exc)
        return False

    def delete_one(self, key: str) -> None:
        unlink_quietly(self.path(key))

    def _inc(self, name: str, **labels: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, tier=self.kind, **labels)

    # ---- administration (`kvport cache`) -----------------------------------------------------------------
    def use_namespace(self, namespace: str) -> None:
        """Record ``namespace``'s name under its digest once, for listings (kvport.store.tiers.disk_space)."""
        super().use_namespace(namespace)
        if namespace:
            record_namespace(self.root, namespace)

    def namespaces(self) -> list[NamespaceUsage]:
        """Chunks and bytes per recorded namespace, from every chunk file's header (one 128-byte read each)."""
        names = namespace_names(self.root)
        out: dict[bytes, NamespaceUsage] = {}
        for digest, size, _ in chunks_by_namespace(self._scan()):
            usage = out.get(digest)
            if usage is None:
                usage = out[digest] = NamespaceUsage(digest, names.get(digest, ""))
            usage.chunks += 1
            usage.bytes += size
        return sorted(out.values(), key=lambda u: (-u.bytes, u.name))

    def clear(self, digests=None) -> int:
        wanted = None if digests is None else set(digests)
        deleted = 0
        for digest, _, path in chunks_by_namespace(self._scan()):
            if wanted is None or digest in wanted:
                try:
                    os.unlink(path)
                    deleted += 1
                except FileNotFoundError:
                    pass  # evicted meanwhile
        with self._lock:
            self._used = None  # rescan on the next write
        return deleted

    # ---- capacity ----------------------------------------------------------------------------------------
    def _account(self, nbytes: int) -> None:
        with self._lock:
            if self._used is not None:  # None: the first write below learns the real usage from a scan
                self._used += nbytes
                self._written_since_scan += nbytes
            needs_scan = (
                self._used is None
                or self._used > self.capacity
                or self._written_since_scan > RESCAN_FRACTION * self.capacity
            )
        if needs_scan:
            self.enforce_capacity()

    def usage(self) -> int:
        """Bytes of chunk files and live writers' temp files under root, from a fresh scan (debris reclaimed)."""
        return sum(size for _, size, _ in self._scan())

    def enforce_capacity(self) -> int:
        """Rescan the directory, reclaim temp files of dead writers and, over capacity, delete least recently used
        chunks down to the low watermark; returns how many chunks were evicted. Only one process evicts at a time
        (advisory lock); the others skip and rescan later."""
        return self._evict(free_bytes=0)

    def _evict(self, free_bytes: int) -> int:
        """``enforce_capacity``; with ``free_bytes``, the device is full below capacity: evict at least that much
        and a tenth of the usage, so the next writes fit too."""
        if self.read_only:
            return 0
        evicted, used = evict_lru(self.root, self.file_mode, self.capacity, free_bytes)
        if used is not None:
            with self._lock:
                self._used, self._written_since_scan = used, 0
        if evicted and self.metrics is not None:
            self.metrics.inc("evictions", evicted, tier=self.kind)
        return evicted

    def _scan(self) -> list[tuple[float, int, Path]]:
        return scan(self.root, self.read_only)


def write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write every byte of ``buffers`` in order (os.write may write less than asked)."""
    for buf in buffers:
        done = 0
        while done < len(buf):
            done += os.write(fd, buf[done:])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
