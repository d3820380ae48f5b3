"""The cache engine: one model shard's cache, a chunk store (what is cached where) plus a mover (how bytes move).
Owns the load/store sequencing between them and the completions it hands back; must not know engines, hold copy
code or storage code, or let a buffer be read before the device work that fills it finished."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import threading
import time
from typing import TYPE_CHECKING, Any

from kvport.cache.config import CacheConfig
from kvport.cache.facade import CacheFacade
from kvport.cache.pipeline import Handle, Ticket
from kvport.errors import UserError
from kvport.hal.completion import all_of
from kvport.store.chunk_store import ChunkStore
from kvport.store.l1 import Lease
from kvport.store.metrics import CacheMetrics
from kvport.store.read_ahead import NO_SLOT

if TYPE_CHECKING:
    from kvport.cache.mover import ChunkMover
    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor

# Chunks moved by one transfer of a load: large enough that a 8K-token prefix is two transfers, small enough that
# the first scatter starts while later chunks are still being read from a tier.
LOAD_BATCH = 16


def _metrics_label(namespace: str) -> str:
    if len(namespace) <= 64:
        return namespace
    return (
        namespace[:40] + "~" + hashlib.blake2b(namespace.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    )


class CacheEngine(CacheFacade):
    """Scheduler-side processes use ``lookup`` only (tiers by config + namespace); worker-side processes ``bind`` the
    engine's copy descriptor, then ``submit_load``/``submit_store`` (or the blocking ``load``/``store``)."""

    def __init__(self, config: CacheConfig, namespace: str) -> None:
        self.config = config
        self.namespace = namespace
        self.chunk_tokens = config.chunk_tokens
        self.metrics = CacheMetrics(_metrics_label(namespace))
        self.chunks = ChunkStore(config, namespace, self.metrics)
        self.mover: ChunkMover | None = None
        self._scratch = None  # one chunk, for tier reads when every L1 slot is pinned
        self._scratch_lock = threading.Lock()
        self._prefetcher: cf.ThreadPoolExecutor | None = None
        self._setup_lock = threading.Lock()
        self._init_facade()

    # ---- setup -------------------------------------------------------------------------------------------
    def bind(self, descriptor: CopyDescriptor, backend: Backend | None = None) -> None:
        """Attach the engine's KV memory (worker side): picks the platform and backend and allocates L1 once."""
        self._check_open()
        if self.mover is not None:
            raise RuntimeError("CacheEngine.bind called twice; create one engine per KV cache registration")
        from kvport.cache.config import check_machine_limits
        from kvport.cache.mover import build_mover

        check_machine_limits(self.config)  # L1 beyond memory, a disk tier beyond its filesystem: before allocating
        mover = build_mover(descriptor, self.chunk_tokens, self.config.backend, backend, self.config.transfer_path)
        platform = mover.platform
        chunk_bytes = descriptor.canonical_bytes(self.chunk_tokens)
        try:
            self.chunks.open_l1(chunk_bytes, descriptor.fingerprint, platform.host_empty)
            self._scratch = platform.host_empty(chunk_bytes)
        except (MemoryError, RuntimeError) as exc:  # e.g. pinned memory past `ulimit -l` or the driver's limit
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise UserError(f"cache config: l1_bytes={self.config.l1_bytes} cannot be allocated ({reason})") from None
        self.mover = mover

    @property
    def l1(self):
        return self.chunks.l1

    @property
    def chunk_bytes(self) -> int:
        self._check_bound()
        return self.chunks.l1.chunk_bytes

    def chunk_keys(self, tokens, extra: bytes = b"") -> list[str]:
        """One key per full chunk of ``tokens`` (a partial tail chunk has no key and is never stored). ``extra``, here
        and below, is the request's own key root component (kvport.store.keys.root_digest): b"" for plain text."""
        return self.chunks.keys(tokens, extra)

    # ---- lookup ------------------------------------------------------------------------------------------
    def lookup(self, tokens, start: int = 0, extra: bytes = b"") -> int:
        """Where the cached run of ``tokens`` that begins at the chunk holding token ``start`` ends, in tokens (a
        multiple of chunk_tokens; ``start // chunk_tokens * chunk_tokens`` when that chunk is not cached), in L1 or
        any tier. With ``start=0`` it is the longest cached prefix."""
        self._check_open()
        first = start // self.chunk_tokens
        return (first + self.chunks.lookup(tokens, first, extra)) * self.chunk_tokens

    def lookup_keys(self, keys) -> int:
        """Leading chunks of ``keys`` (derived by the adapter) cached in L1 or any tier, in chunks."""
        self._check_open()
        return self.chunks.lookup_keys(keys)

    # ---- store -------------------------------------------------------------------------------------------
    def submit_store(
        self,
        tokens,
        block_ids,
        num_tokens: int | None = None,
        skip_tokens: int = 0,
        extra: bytes = b"",
        *,
        engine_waits: bool = False,
    ) -> Ticket:
        """Gather the full chunks of ``tokens[:num_tokens]`` out of the engine blocks into L1, asynchronously.

        Chunks before ``skip_tokens // chunk_tokens`` and chunks already cached are skipped. The gather is ordered
        after the work on the engine's current stream (the forward that wrote the KV). The engine must not reuse the
        blocks before ``ticket.completion`` (order its stream after it); the chunks become visible in L1 and go to
        the tiers once it finished. Stops (never blocks, never allocates) when L1 has no free slot, and never
        evicts this request's own chunks or pins the whole of L1. ``engine_waits``: the engine orders its next work
        after the completion's release (``wait_on``), so the transfer path that releases sooner is preferred."""
        self._check_bound()
        num_tokens = len(tokens) if num_tokens is None else num_tokens
        keys = self.chunks.keys(tokens[:num_tokens], extra)
        return self.submit_store_keys(keys, block_ids, skip_tokens // self.chunk_tokens, engine_waits=engine_waits)

    def submit_store_keys(self, keys, block_ids, skip_chunks: int = 0, *, engine_waits: bool = False) -> Ticket:
        """``submit_store`` for chunk keys the engine adapter derived itself (one per full chunk, in token order)."""
        self._check_bound()
        keys = list(keys)
        tables = self.descriptor.normalize_block_ids(block_ids)
        own = frozenset(keys)
        # One slot always stays for loads and other requests. The request's chunks still pinned by its earlier
        # stores (a gather or tier write in flight) count against its share: vLLM stores a long prompt step by step.
        cap = max(1, self.chunks.l1.num_slots - 1) - self.chunks.l1.pinned_count(among=own)
        leases: list[Lease] = []
        indices: list[int] = []
        for index in self.chunks.absent(keys, skip_chunks):
            if len(leases) >= cap:
                self.metrics.inc("skipped", len(keys) - index, reason="l1_share")
                break
            lease = self.chunks.reserve(keys[index], protect=own)
            if lease is None:
                if self.chunks.l1.contains(keys[index]):  # stored meanwhile by another thread
                    continue
                break  # L1 exhausted (or the chunk is being written right now): later chunks would be unreachable
            leases.append(lease)
            indices.append(index)
        if not leases:
            return Ticket.settled(0)
        start = time.perf_counter()
        try:
            completion = self.mover.to_host(
                [self.chunk_tables(tables, i) for i in indices],
                [lease.buffer for lease in leases],
                self.chunk_tokens,
                engine_waits,
            )
        except BaseException:
            self.chunks.abort(leases)
            raise
        ticket = Ticket(len(leases) * self.chunk_tokens, completion)

        def settle(error: BaseException | None) -> None:
            if error is not None:
                self.chunks.abort(leases)
                self.metrics.inc("failures", tier="l1", reason="gather_error")
                ticket.settle(error)
                return
            self.metrics.transfer(
                "l1", "write", sum(lease.buffer.numel() for lease in leases), time.perf_counter() - start
            )
            self.metrics.inc("tokens_stored", ticket.tokens)
            try:
                self.chunks.admit(leases)
            except BaseException as exc:
                ticket.settle(exc)
                raise
            ticket.settle()

        self._track(ticket)
        completion.add_done_callback(settle)
        return ticket

    # ---- load --------------------------------------------------------------------------------------------
    def submit_load(
        self,
        tokens,
        block_ids,
        num_tokens: int,
        skip_tokens: int = 0,
        extra: bytes = b"",
        *,
        engine_waits: bool = False,
    ) -> Ticket:
        """Scatter the cached full chunks of ``tokens[skip_tokens:num_tokens]`` into the engine blocks, in order.

        Blocks holding tokens before ``skip_tokens`` are never written (the engine computed them and may share them
        between requests): when ``skip_tokens`` falls inside a chunk, only that chunk's blocks from ``skip_tokens`` on
        are written (``skip_tokens`` must then be a multiple of every group's tokens_per_block, else nothing is
        loaded). Stops at the first chunk that is missing or fails validation; ``ticket.tokens`` is how many tokens
        were loaded from ``skip_tokens`` on, known when this returns. Every chunk was checksummed before it is
        scattered. The engine orders its stream after ``ticket.completion`` before it reads the blocks
        (``engine_waits``: it does so with ``wait_on``, as ``submit_store``)."""
        self._check_bound()
        keys = self.chunks.keys(tokens[:num_tokens], extra)
        return self.submit_load_keys(keys, block_ids, skip_tokens, engine_waits=engine_waits)

    def submit_load_keys(self, keys, block_ids, skip_tokens: int = 0, *, engine_waits: bool = False) -> Ticket:
        """``submit_load`` for chunk keys the engine adapter derived itself (one per full chunk, in token order)."""
        self._check_bound()
        keys = list(keys)
        first, offset = divmod(skip_tokens, self.chunk_tokens)
        if offset and any(offset % group.tokens_per_block for group in self.descriptor.groups):
            self.metrics.inc("skipped", reason="unaligned_skip")
            return Ticket.settled(0)
        tables = self.descriptor.normalize_block_ids(block_ids)
        completions = []
        batch: list[tuple[int, Lease]] = []
        loaded = 0
        fetches = self.chunks.fetch(keys[first:])
        try:
            for index, got in enumerate(fetches, first):
                if got is None:
                    break
                if index == first and offset:
                    if not self._load_tail(got, keys[index], tables, index, offset):
                        break
                    loaded += self.chunk_tokens - offset
                    continue
                if got is NO_SLOT:
                    completions.append(self._flush(batch, tables, engine_waits))
                    if not self._load_via_scratch(keys[index], tables, index):
                        break
                else:
                    batch.append((index, got))
                    if len(batch) == LOAD_BATCH:
                        completions.append(self._flush(batch, tables, engine_waits))
                loaded += self.chunk_tokens
            completions.append(self._flush(batch, tables, engine_waits))
        except BaseException:
            for _, lease in batch:
                lease.release()
            raise
        finally:
            fetches.close()
        self.metrics.inc("tokens_loaded", loaded)
        completion = all_of(completions)
        ticket = Ticket(loaded, completion)
        self._track(ticket)
        completion.add_done_callback(ticket.settle)
        return ticket

    def _flush(self, batch: list[tuple[int, Lease]], tables: list, engine_waits: bool = False):
        """One transfer for the leased chunks in ``batch``; the leases are released when it finished (a read-ahead
        may then reuse their slots, never while the scatter still reads them)."""
        if not batch:
            return all_of([])
        leases = [lease for _, lease in batch]
        start = time.perf_counter()
        completion = self.mover.from_host(
            [lease.buffer for lease in leases],
            [self.chunk_tables(tables, i) for i, _ in batch],
            self.chunk_tokens,
            engine_waits,
        )
        batch.clear()
        nbytes = sum(lease.buffer.numel() for lease in leases)

        def release(error: BaseException | None) -> None:
            if error is None:
                self.metrics.transfer("l1", "read", nbytes, time.perf_counter() - start)
            for lease in leases:
                lease.release()

        completion.add_done_callback(release)
        return completion

    def _load_via_scratch(self, key: str, tables: list, index: int) -> bool:
        with self._scratch_lock:
            if not self.chunks.read_into(key, self._scratch):
                return False
            # The scratch buffer is reused by the next chunk: wait for this scatter before giving it back.
            self.mover.from_host([self._scratch], [self.chunk_tables(tables, index)], self.chunk_tokens).wait()
            return True

    def _load_tail(self, got, key: str, tables: list, index: int, offset: int) -> bool:
        """Scatter tokens [offset, chunk_tokens) of chunk ``index`` (an L1 lease, or NO_SLOT: read from a tier) and
        wait for it. The canonical chunk of n tokens is each stream's first slot_count(n) slots in stream order, so
        the tail is each stream's slots from slot_count(offset) on, packed into the scratch buffer."""
        import torch

        descriptor, chunk = self.descriptor, self.chunk_tokens
        tail = chunk - offset
        with self._scratch_lock:
            if got is NO_SLOT:
                if not self.chunks.read_into(key, self._scratch):
                    return False
                source = self._scratch
            else:
                source = got.buffer
            try:
                parts = []
                for stream, start in zip(descriptor.streams, descriptor.stream_offsets(chunk)):
                    skip = descriptor.groups[stream.group].slot_count(offset) * stream.slot_bytes
                    size = descriptor.stream_bytes(stream, tail)
                    parts.append(source[start + skip : start + skip + size])
                packed = torch.cat(parts)  # a copy: ``source`` may be the scratch buffer it is written back to
            finally:
                if got is not NO_SLOT:
                    got.release()
            self._scratch[: packed.numel()].copy_(packed)
            tail_tables = [
                ids[offset // group.tokens_per_block :]
                for group, ids in zip(descriptor.groups, self.chunk_tables(tables, index))
            ]
            # The scratch buffer is reused by the next partial or scratch load: wait for this scatter.
            self.mover.from_host([self._scratch[: packed.numel()]], [tail_tables], tail).wait()
        return True

    def prefetch(self, tokens) -> Handle:
        """Pull the cached prefix of ``tokens`` from the tiers into L1 in the background; ``wait()`` returns the
        tokens now in L1 (the load that follows then reads memory only)."""
        self._check_bound()

        def run() -> int:
            count = 0
            fetches = self.chunks.fetch(self.chunks.keys(tokens))
            try:
                for got in fetches:
                    if not isinstance(got, Lease):
                        break
                    got.release()
                    count += self.chunk_tokens
            finally:
                fetches.close()
            return count

        with self._setup_lock:
            if self._prefetcher is None:
                self._prefetcher = cf.ThreadPoolExecutor(1, thread_name_prefix="kvport-prefetch")
        return Handle(self._prefetcher.submit(run))

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, bytes, failures, evictions, skipped, tokens...) plus the pools' state."""
        out = self.chunks.stats()
        if self.mover is not None:
            out["backend"] = self.mover.backend.name
            out["platform"] = self.mover.platform.name
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait for submitted stores and their tier writes (visible to other processes afterwards); TimeoutError
        when that takes longer than ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._settle_inflight(deadline)
        self.chunks.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self, drain: bool = True) -> None:
        """Finish (``drain``) or cancel queued tier writes, then stop. Every chunk ends up wholly stored or absent:
        a write in progress completes its rename or leaves only a temp file."""
        if self._closed:
            return
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=not drain)
        # Device work cannot be cancelled: every submitted move settles (commits or frees its L1 slots) first.
        self._settle_inflight(swallow=True)
        self.chunks.close(drain)
        self._closed = True
