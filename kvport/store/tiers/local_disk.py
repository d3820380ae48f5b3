"""The local-disk tier: one file per chunk, written to a temporary name then renamed, validated on every read.
Owns the on-disk layout, capacity eviction and cross-process safety; must not cache chunk contents in memory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvport.errors import UserError
from kvport.store.envelope import (
    HEADER_BYTES,
    NO_NAMESPACE,
    Header,
    checksum,
    namespace_digest,
    open_header,
    recorded_namespace,
    seal_header,
)
from kvport.store.tiers.base import NamespaceUsage, ReadResult, ThreadedTier, options_from

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

SUFFIX = ".kvc"
TMP_PREFIX = ".tmp."
# A temp file this old belongs to a writer that died (kill -9, power loss): a live write of one chunk takes
# well under a second on the 0.3 GB/s disk measured on the dev VM, so an hour leaves no doubt.
STALE_TMP_S = 3600.0
# Evict down to this fraction of capacity, so one eviction pass (a directory scan) covers many stores.
LOW_WATERMARK = 0.9
# Rescan the directory after this fraction of capacity was written by this process, to see other writers.
RESCAN_FRACTION = 0.1
OPTIONS = ("path", "bytes", "fsync", "read_threads", "write_threads")
# Namespace digest -> name files (for `kvport cache list`); chunk files record only the digest.
NAMES_DIR = ".namespaces"


def _as_bytes_view(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tier buffers must be contiguous CPU tensors")
    return memoryview(tensor.numpy()).cast("B")


def parse_options(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked options of a ``{type: local_disk, path: ..., bytes: ..., fsync: ...}`` spec (no disk is touched)."""
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
    return out


class LocalDiskTier(ThreadedTier):
    """Chunks under ``root/<key[:2]>/<key>.kvc``. Two processes may share ``root``: renames are atomic, readers
    validate everything, evictions and corrupt-chunk deletions tolerate the other process doing the same."""

    kind = "local_disk"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> LocalDiskTier:
        o = parse_options(spec, where)
        return cls(o["path"], o["bytes"], o["fsync"], metrics, o["read_threads"], o["write_threads"])

    def __init__(
        self,
        root: str | os.PathLike,
        capacity_bytes: int,
        fsync: bool = False,
        metrics: CacheMetrics | None = None,
        read_threads: int = 2,
        write_threads: int = 2,
    ) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"local_disk tier {self.root}: cannot create directory ({exc.strerror})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise UserError(f"local_disk tier {self.root}: directory is not writable")
        self.capacity = capacity_bytes
        self.fsync = fsync
        self.metrics = metrics
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes on disk as of the last scan plus our writes since; None = not scanned
        self._written_since_scan = 0
        super().__init__(read_threads, write_threads)

    def describe(self) -> str:
        return f"local_disk {self.root} ({self.capacity / 2**30:.1f} GiB)"

    def stats(self) -> dict[str, Any]:
        entries = self._scan()
        return {"bytes": sum(size for _, size, _ in entries), "capacity_bytes": self.capacity, "chunks": len(entries)}

    # ---- paths -------------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / (key + SUFFIX)

    # ---- reads -------------------------------------------------------------------------------------------
    def contains_one(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def get_one(self, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
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
        path = self.path(key)
        if path.exists():
            return None  # same key = same tokens and namespace: content is the same; nothing written
        payload = _as_bytes_view(src)
        header = seal_header(key, fingerprint, payload, namespace=self.namespace)
        tmp = path.parent / f"{TMP_PREFIX}{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, [memoryview(header), payload])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)  # atomic: readers see the old state or the whole new file
            if self.fsync:
                _fsync_dir(path.parent)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if self.metrics is not None:
                reason = "disk_full" if exc.errno == errno.ENOSPC else "io_error"
                self.metrics.inc("failures", tier=self.kind, reason=f"write_{reason}")
            return False
        self._account(HEADER_BYTES + len(payload))
        return True

    def delete_one(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    # ---- administration (`kvport cache`) -----------------------------------------------------------------
    def use_namespace(self, namespace: str) -> None:
        """Record ``namespace``'s name under its digest once (temp name then rename), for listings."""
        super().use_namespace(namespace)
        if not namespace:
            return
        names = self.root / NAMES_DIR
        path = names / (namespace_digest(namespace).hex() + ".json")
        if path.exists():
            return
        try:
            names.mkdir(exist_ok=True)
            tmp = names / f"{TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps({"namespace": namespace}))
            os.rename(tmp, path)
        except OSError:
            pass  # a listing then shows the digest only; storing chunks is unaffected

    def namespaces(self) -> list[NamespaceUsage]:
        """Chunks and bytes per recorded namespace, from every chunk file's header (one 128-byte read each)."""
        names = self._names()
        out: dict[bytes, NamespaceUsage] = {}
        for digest, size, _ in self._chunks_by_namespace():
            usage = out.get(digest)
            if usage is None:
                usage = out[digest] = NamespaceUsage(digest, names.get(digest, ""))
            usage.chunks += 1
            usage.bytes += size
        return sorted(out.values(), key=lambda u: (-u.bytes, u.name))

    def clear(self, digests=None) -> int:
        wanted = None if digests is None else set(digests)
        deleted = 0
        for digest, _, path in self._chunks_by_namespace():
            if wanted is None or digest in wanted:
                try:
                    os.unlink(path)
                    deleted += 1
                except FileNotFoundError:
                    pass  # evicted meanwhile
        with self._lock:
            self._used = None  # rescan on the next write
        return deleted

    def _names(self) -> dict[bytes, str]:
        out = {NO_NAMESPACE: ""}
        try:
            entries = list(os.scandir(self.root / NAMES_DIR))
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

    def _chunks_by_namespace(self):
        """(namespace digest, size, path) of every chunk file whose header parses."""
        for _, size, path in self._scan():
            if path.name.startswith(TMP_PREFIX):
                continue
            try:
                with open(path, "rb") as f:
                    digest = recorded_namespace(f.read(HEADER_BYTES))
            except OSError:
                continue
            if digest is not None:
                yield digest, size, path

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
        """Bytes of chunk files (and live temp files) under root, from a fresh scan."""
        return sum(size for _, size, _ in self._scan())

    def enforce_capacity(self) -> int:
        """Rescan the directory and delete least recently used chunks down to the low watermark; returns how
        many were evicted. Only one process evicts at a time (advisory lock); the others skip and rescan later."""
        lock_path = self.root / ".evict.lock"
        with open(lock_path, "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            entries = self._scan()
            total = sum(size for _, size, _ in entries)
            evicted = 0
            if total > self.capacity:
                target = LOW_WATERMARK * self.capacity
                for _, size, path in sorted(entries, key=lambda e: e[0]):
                    if total <= target:
                        break
                    if path.name.startswith(TMP_PREFIX):
                        continue  # a live writer's file; stale ones were removed by _scan
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass  # evicted or replaced by the other process
                    total -= size
                    evicted += 1
            with self._lock:
                self._used = total
                self._written_since_scan = 0
        if evicted and self.metrics is not None:
            self.metrics.inc("evictions", evicted, tier=self.kind)
        return evicted

    def _scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every chunk and live temp file; removes temp files of dead writers."""
        now = time.time()
        found = []
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime > STALE_TMP_S:
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass
                        continue
                elif not entry.name.endswith(SUFFIX):
                    continue
                found.append((st.st_mtime, st.st_size, Path(entry.path)))
        return found


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
