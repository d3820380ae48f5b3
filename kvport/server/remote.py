"""The cache facade over `kvport server`: CacheEngine's interface (bind, lookup, submit_load/submit_store -> Tickets,
stats, flush, close) for engine processes that share one node cache. Owns the client half of the data path: the
mover gathers into and scatters out of the server's shared L1 slots with this process's backend and completions;
must not let the server see a chunk before its gather finished, or release a pin before its scatter finished.

Where this process cannot use the shared memory as it is, bytes go through a local staging buffer: on platforms
with pinned memory that cannot page-lock a foreign mapping (XPU: no host-register call in torch) a host copy
to/from the slot, and with ``server_transport: copy`` (a client that cannot map the server's memory at all, e.g.
another container) over the socket. Both are chosen by platform or configuration, never silently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kvport.cache.facade import CacheFacade
from kvport.cache.pipeline import Ticket
from kvport.errors import UserError
from kvport.server import protocol as P
from kvport.server.client import Connection, ServerError, ServerUnavailable
from kvport.server.keycache import KeyCache
from kvport.server.shm import SharedArena
from kvport.store.metrics import CacheMetrics

if TYPE_CHECKING:
    import torch

    from kvport.cache.config import CacheConfig
    from kvport.cache.mover import ChunkMover
    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor

log = logging.getLogger("kvport.server.client")


class RemoteCache(CacheFacade):
    """Scheduler-side processes only look up (no shared memory mapped); worker-side processes ``bind`` their KV
    memory, map the server's L1 and open their namespace there. While the server is down every lookup is a miss
    and every store is skipped (counted); the connection comes back by itself."""

    remote = True

    def __init__(self, config: CacheConfig, namespace: str) -> None:
        if not config.server:
            raise ValueError("RemoteCache needs config.server")
        from kvport.cache.engine import _metrics_label

        self.config, self.namespace, self.chunk_tokens = config, namespace, config.chunk_tokens
        self.metrics = CacheMetrics(_metrics_label(namespace))
        self.keys = KeyCache(config.chunk_tokens, namespace, config.salt, scheme=config.key_scheme)
        self.mover: ChunkMover | None = None
        self._chunk_bytes = 0
        self._fingerprint = ""
        self._arena: SharedArena | None = None
        # Arenas this client page-locked (cudaHostRegister): unregistered at close, after every move settled. A
        # mapping unmapped while still registered leaves the registration on its address range, and the next
        # mapping placed there would look page-locked while the copy engines write the old pages (seen on the H200).
        self._registered: list[SharedArena] = []
        self._staged = config.server_transport == "copy"
        self._prepare_lock = threading.Lock()
        self._init_facade()
        self.conn = Connection(
            config.server,
            config.server_token,
            config.server_transport,
            config.server_timeout_ms,
            name=f"{namespace[:120]} pid {os.getpid()}",
            on_connect=self._on_connect,
        )
        self.conn.start()

    # ---- setup -------------------------------------------------------------------------------------------
    def bind(self, descriptor: CopyDescriptor, backend: Backend | None = None) -> None:
        """Attach the engine's KV memory: mover as CacheEngine has it; then map the server's L1 and open this
        namespace (now if the server is up, else when it comes back). A server that refuses (another layout
        under this namespace, a chunk larger than its slots, memory this process may not map) is a UserError."""
        self._check_open()
        if self.mover is not None:
            raise RuntimeError("RemoteCache.bind called twice")
        from kvport.cache.mover import build_mover

        mover = build_mover(descriptor, self.chunk_tokens, self.config.backend, backend, self.config.transfer_path)
        self._chunk_bytes = descriptor.canonical_bytes(self.chunk_tokens)
        self._fingerprint = descriptor.fingerprint
        self.mover = mover
        if self.conn.up:
            try:
                self._prepare(self.conn.info, self.conn.call)
            except ServerUnavailable:
                pass  # went down meanwhile: the reconnect prepares

    def _on_connect(self, info: dict, call) -> None:
        if self.mover is not None:
            self._prepare(info, call)

    def _prepare(self, info: dict, call) -> None:
        with self._prepare_lock:
            if self.config.server_transport == "shm" and (self._arena is None or str(self._arena.path) != info["shm"]):
                try:
                    arena = SharedArena.attach(info["shm"], int(info["shm_bytes"]))
                except OSError as exc:
                    raise UserError(
                        f"kvport server {self.config.server}: cannot map its shared memory {info['shm']} "
                        f"({getattr(exc, 'strerror', None) or exc}); run as a user the server allows, or set "
                        "server_transport: copy for a client that cannot share memory with it"
                    ) from None
                platform = self.mover.platform
                if platform.pinned_host and arena.tensor.is_pinned():
                    # A mapping made just now cannot be page-locked yet: the runtime still holds a registration of
                    # an earlier mapping at these addresses (unmapped without cudaHostUnregister, by other code),
                    # and DMA would reach that mapping's old pages. Never used for copies: staged instead.
                    self._staged = True
                    log.warning(
                        "kvport: the server's shared memory mapped onto addresses still registered with %s by an "
                        "earlier mapping; every chunk takes one extra host copy through a pinned staging buffer",
                        platform.name,
                    )
                else:
                    self._staged = platform.pinned_host and not platform.register_host(arena.tensor)
                    if self._staged:
                        log.warning(
                            "kvport: %s cannot page-lock the server's shared memory: every chunk takes one extra "
                            "host copy through a pinned staging buffer",
                            platform.name,
                        )
                    elif platform.pinned_host:
                        self._registered.append(arena)
                self._arena = arena
            try:
                fields = {"ns": self.namespace, "chunk_tokens": self.chunk_tokens, "chunk_bytes": self._chunk_bytes}
                call("open", {**fields, "fingerprint": self._fingerprint})
            except ServerError as exc:
                raise UserError(f"kvport server {self.config.server}: {exc}") from None

    @property
    def chunk_bytes(self) -> int:
        self._check_bound()
        return self._chunk_bytes

    def chunk_keys(self, tokens) -> list[str]:
        return self.keys.keys(tokens)

    # ---- lookup ------------------------------------------------------------------------------------------
    def lookup(self, tokens, start: int = 0, extra: bytes = b"") -> int:
        """As CacheEngine.lookup: where the run the server holds (L1 or a tier) from the chunk holding token
        ``start`` ends, in tokens; that chunk's start while the server is down."""
        self._check_open()
        first = start // self.chunk_tokens
        return (first + self._lookup_chunks(self.keys.keys(tokens, extra=extra)[first:])) * self.chunk_tokens

    def _lookup_chunks(self, keys: list[str]) -> int:
        start = time.perf_counter()
        if not keys:
            return 0
        reply = self._call("lookup", {"ns": self.namespace}, [P.keys_frame(keys)])
        if reply is None:
            return 0
        hits = int(reply[0]["chunks"])
        if hits:
            self.metrics.inc("hits", hits, op="lookup", tier="server")
        if hits < len(keys):
            self.metrics.inc("misses", op="lookup", tier="all")
        self.metrics.observe("latency", time.perf_counter() - start, op="lookup")
        return hits

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
        """As CacheEngine.submit_store: the server reserves slots for the absent chunks, this process gathers into
        them, and commits once the gather's completion fired (a failed gather aborts: nothing half-written is
        ever visible). The ticket settles after the commit."""
        self._check_bound()
        keys = self.keys.keys(tokens, num_tokens, extra)
        first = skip_tokens // self.chunk_tokens
        if first >= len(keys):
            return Ticket.settled(0)
        reply = self._call("reserve", {"ns": self.namespace, "start": first}, [P.keys_frame(keys)])
        if reply is None or not reply[0]["idx"]:
            return Ticket.settled(0)
        rid, indices, offsets = reply[0]["rid"], reply[0]["idx"], reply[0]["off"]
        tables = self.descriptor.normalize_block_ids(block_ids)
        try:
            slots = self._views(offsets)
            buffers = self._staging(len(indices)) if self._staged else slots
            start = time.perf_counter()
            tables_of = [self.chunk_tables(tables, i) for i in indices]
            completion = self.mover.to_host(tables_of, buffers, self.chunk_tokens, engine_waits)
        except BaseException:
            self._call("commit", {"rid": rid, "ok": False})
            raise
        ticket = Ticket(len(indices) * self.chunk_tokens, completion)

        def settle(error: BaseException | None) -> None:
            if error is not None:
                self._call("commit", {"rid": rid, "ok": False})
                self.metrics.inc("failures", len(indices), tier="l1", reason="gather_error")
                ticket.settle(error)
                return
            seconds, nbytes = time.perf_counter() - start, len(indices) * self._chunk_bytes
            frames = []
            if self._staged and slots is not None:
                for slot, staged in zip(slots, buffers):
                    slot.copy_(staged)
            elif self._staged:
                frames = [memoryview(b.numpy()) for b in buffers]
            fields = {"rid": rid, "ok": True, "nbytes": nbytes, "seconds": seconds}
            if self._call("commit", fields, frames) is not None:
                self.metrics.transfer("l1", "write", nbytes, seconds)
                self.metrics.inc("tokens_stored", ticket.tokens)
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
        """As CacheEngine.submit_load: the server pins the leading run of cached chunks from chunk
        ``skip_tokens // chunk_tokens`` (reading tiers into its L1 as needed), this process scatters them straight
        out of the shared slots and releases the pin once the scatter's completion fired. ``ticket.tokens`` is what
        was pinned (known when this returns). A ``skip_tokens`` inside a chunk (vLLM's own hit ending mid-chunk)
        loads nothing through the server (counted): vLLM recomputes, never a block it shares is overwritten."""
        self._check_bound()
        first, offset = divmod(skip_tokens, self.chunk_tokens)
        if offset:
            self.metrics.inc("skipped", reason="unaligned_skip")
            return Ticket.settled(0)
        keys = self.keys.keys(tokens, num_tokens, extra)[first:]
        if not keys:
            return Ticket.settled(0)
        reply = self._call("pin", {"ns": self.namespace}, [P.keys_frame(keys)])
        if reply is None or not reply[0]["chunks"]:
            return Ticket.settled(0)
        header, data = reply
        count, pin = int(header["chunks"]), int(header["pin"])
        tables = self.descriptor.normalize_block_ids(block_ids)
        try:
            if self._staged:
                buffers = self._staging(count)
                slots = self._views(header["off"])
                for i, buffer in enumerate(buffers):
                    if slots is not None:
                        buffer.copy_(slots[i])
                    else:  # the socket's frames are read-only bytes: copied into the staging buffer
                        buffer.numpy()[:] = memoryview(data[i]).cast("B")
                if pin:
                    self._call("release", {"pin": pin, "ok": True})  # copied out: the slots may go
                    pin = 0
            else:
                buffers = self._views(header["off"])
            start = time.perf_counter()
            completion = self.mover.from_host(
                buffers, [self.chunk_tables(tables, first + i) for i in range(count)], self.chunk_tokens, engine_waits
            )
        except BaseException:
            if pin:
                self._call("release", {"pin": pin, "ok": False})
            raise
        ticket = Ticket(count * self.chunk_tokens, completion)
        self.metrics.inc("tokens_loaded", ticket.tokens)

        def settle(error: BaseException | None) -> None:
            seconds, nbytes = time.perf_counter() - start, count * self._chunk_bytes
            if pin:
                self._call("release", {"pin": pin, "ok": error is None, "nbytes": nbytes, "seconds": seconds})
            if error is None:
                self.metrics.transfer("l1", "read", nbytes, seconds)
            ticket.settle(error)

        self._track(ticket)
        completion.add_done_callback(settle)
        return ticket

    # ---- helpers -----------------------------------------------------------------------------------------
    def _call(self, op: str, fields: dict, frames=()) -> tuple[dict, list] | None:
        """The reply, or None when the server is down or refused (counted; the caller serves a miss)."""
        try:
            return self.conn.call(op, fields, frames)
        except ServerUnavailable:
            self.metrics.inc("failures", tier="server", reason="unavailable")
        except ServerError as exc:
            self.metrics.inc("failures", tier="server", reason=exc.reason)
            log.warning("kvport: server refused %s: %s", op, exc)
        return None

    def _views(self, offsets) -> list[torch.Tensor] | None:
        if self.config.server_transport != "shm":
            return None
        return [self._arena.view(int(off), self._chunk_bytes) for off in offsets]

    def _staging(self, count: int) -> list[torch.Tensor]:
        """Fresh pinned host buffers (the slow path: one allocation per move, freed when its completion is)."""
        flat = self.mover.platform.host_empty(count * self._chunk_bytes)
        return [flat[i * self._chunk_bytes : (i + 1) * self._chunk_bytes] for i in range(count)]

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = self.metrics.snapshot()
        out["server"] = {"address": self.config.server, "up": self.conn.up, "transport": self.config.server_transport}
        out["server"] |= dict(self.conn.counters) | {"last_error": self.conn.last_error, "staged": self._staged}
        out["key_cache"] = {"hits": self.keys.hits, "derived": self.keys.derived}
        if self.mover is not None:
            out["backend"] = self.mover.backend.name
            out["platform"] = self.mover.platform.name
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait for submitted stores (committed to the server afterwards) and the server's tier writes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._settle_inflight(deadline)
        left = 600.0 if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.conn.call("flush", {"timeout": left}, timeout_ms=int(left * 1000) + self.config.server_timeout_ms)
        except ServerUnavailable:
            pass  # nothing of ours is pending on a server that is gone
        except ServerError as exc:
            raise TimeoutError(str(exc)) from None

    def close(self, drain: bool = True) -> None:
        """Settle every submitted move (device work cannot be cancelled), then leave the server. The server keeps
        the chunks: another process, or this engine restarted, finds them."""
        if self._closed:
            return
        self._settle_inflight(swallow=True)
        self.conn.close()
        for arena in self._registered:  # every move settled: nothing reads or writes these pages any more
            self.mover.platform.unregister_host(arena.tensor)
        self._registered.clear()
        self._closed = True
