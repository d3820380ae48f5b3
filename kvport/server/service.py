"""`kvport server`: one event loop on a ZMQ ROUTER socket that hosts the node's chunk stores (shared L1 in shared
memory, the tiers, the index) for every engine process. Owns request handling, access checks and client death
handling; must not move KV between devices (clients do, into and out of the shared slots) or block on one client.

Requests that may touch a tier (lookups and pins past L1, reserves and commits when tiers exist, flush, stats) run on
a small thread pool and answer through an inproc socket, so a slow disk read never delays another client's reply.
ZMQ fair-queues incoming messages across clients and a ROUTER drops (never blocks on) replies to a client that
stops reading, so one client cannot stall the loop.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import secrets
import threading
import time
from typing import Any

import zmq

from kvport.cache.config import CacheConfig
from kvport.errors import UserError
from kvport.server import protocol as P
from kvport.server.address import ipc_path
from kvport.server.config import ServerConfig
from kvport.server.handlers import RequestHandlers
from kvport.server.listen import bind_router, chown_to_group, remove_stale_arenas
from kvport.server.namespaces import Namespaces
from kvport.server.server_metrics import ServerStats
from kvport.server.sessions import Session, Sessions
from kvport.server.shared_l1 import SharedL1
from kvport.server.shm import SharedArena
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers import build_tier

log = logging.getLogger("kvport.server")

REAP_INTERVAL_S = 0.2  # how often dead clients are looked for: a killed client's slots are free within this
GAUGE_CACHE_S = 5.0  # tier usage is a directory scan for the disk tier: at most once per this for /metrics
TIER_OPS = ("lookup", "reserve", "commit", "pin", "flush", "stats")


class Server(RequestHandlers):
    """The server; requests are answered by the RequestHandlers it inherits (kvport/server/handlers.py)."""

    def __init__(self, server: ServerConfig, cache: CacheConfig) -> None:
        self.config, self.cache_config = server, cache
        self.token = server.resolved_token()
        self.server_id = secrets.token_hex(8)
        self.metrics = CacheMetrics("server")  # shared L1 evictions and the shared tiers' bytes and failures
        self._gauge_cache: tuple[float, dict] | None = None
        self.stats = ServerStats(self._gauges)
        self.tiers = []
        self.arena: SharedArena | None = None
        self._stop = threading.Event()
        self._local = threading.local()
        self._loop_at = time.monotonic()  # last event-loop turn: /health says 503 when the loop is wedged
        self._collector_registered = False
        self.ctx = zmq.Context()
        try:
            for i, spec in enumerate(cache.tier_specs()):
                self.tiers.append(build_tier(spec, f"cache config: tiers[{i}] ({spec.get('type')})", self.metrics))
            remove_stale_arenas(server.shm_dir)
            self.arena = SharedArena.create(
                server.shm_dir,
                f"kvport-{os.getpid()}-{self.server_id}.l1",
                SharedL1.arena_bytes(cache.l1_bytes),
                server.mode,
            )
            chown_to_group(self.arena.path, server.group)
            self.l1 = SharedL1(self.arena, cache.l1_bytes, self.metrics, server.slot_bytes)
            for tier in self.tiers:  # every slot of every namespace is a slice of the arena
                tier.register_memory(self.arena.tensor)
            self.namespaces = Namespaces(cache, self.tiers, self.l1)
            self.sessions = Sessions()
            self.pool = cf.ThreadPoolExecutor(server.threads, thread_name_prefix="kvport-server")
            self.sock = bind_router(self.ctx, server)
            self.replies = self.ctx.socket(zmq.PULL)
            self._reply_addr = f"inproc://kvport-replies-{self.server_id}"
            self.replies.bind(self._reply_addr)
            from prometheus_client import REGISTRY

            REGISTRY.register(self.stats)
            self._collector_registered = True
        except BaseException:
            self._close_resources()
            raise

    # ---- loop --------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        next_reap = time.monotonic() + REAP_INTERVAL_S
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=REAP_INTERVAL_S * 1000 / 2))
            if self.sock in events:
                for _ in range(64):  # a batch per wake-up, then the replies and the reaper get their turn
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._dispatch(frames)
            if self.replies in events:
                for _ in range(256):
                    try:
                        self._send(self.replies.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            now = self._loop_at = time.monotonic()
            if now >= next_reap:
                next_reap = now + REAP_INTERVAL_S
                self._reap()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop taking requests, drop every session, drain tier writes, remove the socket and shared memory."""
        self._stop.set()
        for session in self.sessions.all():
            self.sessions.drop(session)
        self.pool.shutdown(wait=True)
        self.namespaces.close()
        self._close_resources()

    def health(self) -> tuple[bool, dict]:
        """(ok, figures) for /health: ok while the event loop turns (it wakes at least every REAP_INTERVAL_S)."""
        stalled = time.monotonic() - self._loop_at
        ok = not self._stop.is_set() and stalled < 5.0
        gauges = self._gauges()
        return ok, {
            "status": "ok" if ok else "stalled",
            "loop_stalled_s": round(stalled, 3),
            "sessions": gauges["sessions"],
            "namespaces": gauges["namespaces"],
            "l1": gauges["l1"],
            "uptime_s": round(time.time() - self.stats.started, 1),
        }

    def _close_resources(self) -> None:
        if self._collector_registered:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.stats)
            self._collector_registered = False
        for name in ("sock", "replies"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        path = ipc_path(self.config.address)
        if path is not None and getattr(self, "sock", None) is not None:
            path.unlink(missing_ok=True)
        if self.arena is not None:
            self.arena.close()
        self.ctx.term()

    def _reap(self) -> None:
        for session, leases in self.sessions.reap(self.config.client_timeout_s):
            self.stats.inc("sessions_dropped", 1, "died")
            self.stats.inc("leases_dropped", leases)
            if leases:
                log.warning(
                    "kvport server: client %s (pid %s) is gone; dropped %d reserved/pinned slots",
                    session.name,
                    session.pid,
                    leases,
                )

    # ---- dispatch ----------------------------------------------------------------------------------------
    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        route, body = frames[0].bytes, frames[1:]
        try:
            request = P.decode_request([f.buffer for f in body], self.config.max_message_bytes)
        except P.ProtocolError as exc:
            self._send(self._error(route, P.request_id([f.bytes for f in body[:1]]), exc.reason, str(exc)))
            return
        self.stats.inc("requests", 1, request.op)
        if request.op == "hello":
            self._send(self._run(route, request, self._hello, (route, body[0])))
            return
        session = self.sessions.get(route)
        if session is None:
            self._send(self._error(route, request.id, "no_session", "no session: say hello first"))
            return
        if self.tiers and request.op in TIER_OPS:
            self.pool.submit(self._deferred, route, request, session)
            return
        self._send(self._run(route, request, self._handler(request.op), session))

    def _deferred(self, route: bytes, request: P.Request, session: Session) -> None:
        reply = self._run(route, request, self._handler(request.op), session)
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.connect(self._reply_addr)
        push.send_multipart(reply)

    def _handler(self, op: str):
        return getattr(self, f"_op_{op}")

    def _run(self, route: bytes, request: P.Request, handler, arg) -> list:
        start = time.perf_counter()
        try:
            header, frames = handler(request, arg)
        except P.ProtocolError as exc:
            return self._error(route, request.id, exc.reason, str(exc))
        except UserError as exc:
            return self._error(route, request.id, "refused", str(exc))
        except Exception as exc:  # a bug or a tier failure: answer, log, keep serving every other client
            log.exception("kvport server: %s failed", request.op)
            return self._error(route, request.id, "internal", f"{request.op} failed: {type(exc).__name__}")
        self.stats.observe(request.op, time.perf_counter() - start)
        return [route, *P.encode({"id": request.id, **header}, frames)]

    def _error(self, route: bytes, rid: int, reason: str, text: str) -> list:
        self.stats.inc("errors", 1, reason)
        return [route, *P.encode({"id": rid, "error": text[:400], "reason": reason})]

    def _send(self, frames: list) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # the client stopped reading (its queue is full): its reply is dropped, nobody waits
            self.stats.inc("errors", 1, "reply_dropped")

    # ---- figures -----------------------------------------------------------------------------------------
    def _gauges(self) -> dict[str, Any]:
        now = time.monotonic()
        cached = self._gauge_cache
        if cached is None or now - cached[0] > GAUGE_CACHE_S:
            tiers = []
            for tier in self.tiers:
                try:
                    tiers.append({"kind": tier.kind, "describe": tier.describe(), **tier.stats()})
                except Exception:
                    tiers.append({"kind": tier.kind, "describe": tier.describe()})
            cached = self._gauge_cache = (now, {"tiers": tiers})
        return {
            "sessions": len(self.sessions.all()),
            "namespaces": len(self.namespaces.all()),
            "l1": self.l1.usage(),
            "address": self.config.address,
            "pid": os.getpid(),
            **cached[1],
        }
