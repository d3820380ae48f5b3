"""The tier contract: batched, asynchronous chunk storage behind L1 (local disk, key-value servers, object stores).
Owns the interface, the read outcomes and the thread-pool helper for tiers with blocking I/O; must not hold storage
code, know about L1, engines or copy backends, or accept a key that is not a chunk key.

Every call takes many chunks at once, so a networked tier costs one round trip per request, not one per chunk:
``contains_prefix`` answers a whole prefix, ``get`` and ``put`` return one future per chunk. Values are sealed in the
chunk envelope (kvport.store.envelope): a reader sees a whole, checksummed chunk of the right layout or a miss."""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import enum
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

# Chunk keys are blake2b-256 digests in lowercase hex (kvport.store.keys): anything else never reaches storage, so a
# caller cannot make a tier address a path or key outside its own namespace ('../x', 'a/b').
_KEY = re.compile(r"[0-9a-f]{64}")


class ReadResult(enum.Enum):
    """Outcome of one chunk read. Anything but HIT leaves the destination's content undefined and unusable."""

    HIT = "hit"
    MISS = "miss"  # no such chunk
    CORRUPT = "corrupt"  # checksum, header or length mismatch; the tier drops the value
    TRUNCATED = "truncated"  # shorter than its header says; dropped
    WRONG_FINGERPRINT = "wrong_fingerprint"  # stored by another layout; left alone, read as a miss
    IO_ERROR = "io_error"  # the tier could not be read (server down, disk error): a miss for this request
    UNAVAILABLE = "unavailable"  # the tier is not connected right now; a miss


@dataclasses.dataclass
class NamespaceUsage:
    """What one namespace holds in one tier (``kvport cache list``). ``name`` is the namespace string where the tier
    knows it ("" when it knows only the digest); ``digest`` is kvport.store.envelope.namespace_digest of it
    (NO_NAMESPACE for chunks stored before namespaces were recorded)."""

    digest: bytes
    name: str = ""
    chunks: int = 0
    bytes: int = 0


def check_keys(keys: Sequence[str]) -> None:
    for key in keys:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"not a kvport chunk key: {key!r}")


class Tier(abc.ABC):
    """One storage tier. Thread-safe. ``fingerprint`` is the layout fingerprint of the canonical chunk
    (CopyDescriptor.fingerprint): a chunk read with another fingerprint than it was written with is never returned.
    Buffers are contiguous uint8 CPU tensors of exactly one chunk."""

    # Registry name (the ``type`` of a tier spec), e.g. "local_disk".
    kind: str = ""
    # The store's counters (kvport.store.metrics.CacheMetrics) or None; tiers count bytes, seconds and failures.
    metrics: CacheMetrics | None = None
    # Longest a caller waits for one ``get`` future (None: until it is done). A future still running past it is a
    # miss for that request, but the tier may still be writing into its destination until the future is done: the
    # caller must not reuse that buffer before then (ChunkStore keeps such an L1 slot reserved until it finishes).
    timeout_s: float | None = None
    # The namespace of the chunk store that owns this tier instance (set by ``use_namespace``); tiers that can record
    # it with each chunk (the envelope has a field for it) make ``namespaces`` and ``clear`` possible.
    namespace: str = ""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs and status: type and location, never a secret (passwords, tokens)."""

    @abc.abstractmethod
    def contains_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are present (no validation; a load confirms). One round trip."""

    @abc.abstractmethod
    def get(self, keys: Sequence[str], fingerprint: str, dsts: Sequence[torch.Tensor]) -> list[cf.Future]:
        """Read and validate each chunk into its destination; one future of a ReadResult per key."""

    @abc.abstractmethod
    def put(self, keys: Sequence[str], fingerprint: str, srcs: Sequence[torch.Tensor]) -> list[cf.Future]:
        """Store each chunk atomically; one future per key of True (stored now), False (not stored: full, down,
        error) or None (already present: nothing written)."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[str]) -> None:
        """Remove chunks if present."""

    def check_chunk(self, chunk_bytes: int) -> None:
        """Raise a one-line UserError when a chunk of ``chunk_bytes`` can never be stored here (more than the tier's
        capacity or largest value); called at bind, before L1 is allocated. Default: no limit known."""
        return None

    def stats(self) -> dict[str, Any]:
        """Capacity figures for status output (e.g. ``bytes``, ``capacity_bytes``, ``chunks``); {} if unknown."""
        return {}

    def register_memory(self, memory: torch.Tensor) -> None:
        """Learn a host buffer that later ``get``/``put`` buffers are slices of (the L1 pool, registered once when it
        is allocated), so a zero-copy tier can register it with its transport. Optional: the default ignores it."""
        return None

    # ---- administration (optional: `kvport cache`); a tier that cannot answer keeps these defaults ----------------
    def use_namespace(self, namespace: str) -> None:
        """Called once by the chunk store that owns this instance: the chunks it puts belong to ``namespace``."""
        self.namespace = namespace

    def namespaces(self) -> list[NamespaceUsage] | None:
        """Chunks and bytes held per namespace, or None when this tier cannot list them."""
        return None

    def clear(self, digests: Sequence[bytes] | None = None) -> int | None:
        """Delete every chunk of the namespaces with these digests (every chunk when None); how many were deleted,
        or None when this tier cannot. Chunks being written meanwhile may survive."""
        return None

    def close(self) -> None:
        """Release connections and threads; stored chunks stay."""
        return None


class ThreadedTier(Tier):
    """A tier whose I/O blocks (files, a client without async calls): subclasses implement the one-chunk methods,
    this class runs them on bounded thread pools and returns futures. Separate readers and writers, so a load's
    read-ahead never queues behind a burst of stores."""

    def __init__(self, read_threads: int = 2, write_threads: int = 2) -> None:
        self._readers = cf.ThreadPoolExecutor(read_threads, thread_name_prefix=f"kvport-{self.kind}-read")
        self._writers = cf.ThreadPoolExecutor(write_threads, thread_name_prefix=f"kvport-{self.kind}-write")

    @abc.abstractmethod
    def contains_one(self, key: str) -> bool: ...

    @abc.abstractmethod
    def get_one(self, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult: ...

    @abc.abstractmethod
    def put_one(self, key: str, fingerprint: str, src: torch.Tensor) -> bool | None: ...

    @abc.abstractmethod
    def delete_one(self, key: str) -> None: ...

    def contains_prefix(self, keys: Sequence[str]) -> int:
        check_keys(keys)
        for count, key in enumerate(keys):
            if not self.contains_one(key):
                return count
        return len(keys)

    def get(self, keys, fingerprint, dsts) -> list[cf.Future]:
        check_keys(keys)
        return [self._readers.submit(self._timed_get, k, fingerprint, d) for k, d in zip(keys, dsts, strict=True)]

    def put(self, keys, fingerprint, srcs) -> list[cf.Future]:
        check_keys(keys)
        return [self._writers.submit(self._timed_put, k, fingerprint, s) for k, s in zip(keys, srcs, strict=True)]

    def _timed_get(self, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult:
        start = time.perf_counter()
        result = self.get_one(key, fingerprint, dst)
        if result is ReadResult.HIT:
            self._record("read", dst.numel(), time.perf_counter() - start)
        return result

    def _timed_put(self, key: str, fingerprint: str, src: torch.Tensor) -> bool | None:
        start = time.perf_counter()
        stored = self.put_one(key, fingerprint, src)
        if stored:
            self._record("write", src.numel(), time.perf_counter() - start)
        return stored

    def _record(self, op: str, nbytes: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.transfer(self.kind, op, nbytes, seconds)
            self.metrics.observe("latency", seconds, op=f"{self.kind}_{op}")

    def delete(self, keys) -> None:
        check_keys(keys)
        for key in keys:
            self.delete_one(key)

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        self._writers.shutdown(wait=True)


def options_from(spec: Mapping[str, Any], known: Sequence[str], where: str) -> dict[str, Any]:
    """The options of one tier spec without ``type``; an unknown key is a one-line UserError listing the known ones."""
    from kvport.errors import UserError

    out = {str(k): v for k, v in spec.items() if k != "type"}
    for key in out:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    return out
