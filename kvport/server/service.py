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
import errno
import grp
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from kvport.cache.config import CacheConfig
from kvport.errors import UserError
from kvport.server import protocol as P
from kvport.server.address import ipc_path
from kvport.server.config import ServerConfig
from kvport.server.namespaces import Namespaces
from kvport.server.server_metrics import ServerStats
from kvport.server.sessions import Reservation, Session, Sessions, peer_pid
from kvport.server.shared_l1 import SharedL1
from kvport.server.shm import SharedArena
from kvport.store.chunk_store import NO_SLOT
from kvport.store.l1 import Lease
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers import build_tier

log = logging.getLogger("kvport.server")

REAP_INTERVAL_S = 0.2  # how often dead clients are looked for: a killed client's slots are free within this
GAUGE_CACHE_S = 5.0  # tier usage is a directory scan for the disk tier: at most once per this for /metrics
TIER_OPS = ("lookup", "reserve", "commit", "pin", "flush", "stats")


class Server:
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
            _remove_stale_arenas(server.shm_dir)
            self.arena = SharedArena.create(
                server.shm_dir,
                f"kvport-{os.getpid()}-{self.server_id}.l1",
                SharedL1.arena_bytes(cache.l1_bytes),
                server.mode,
            )
            self._chown(self.arena.path)
            self.l1 = SharedL1(self.arena, cache.l1_bytes, self.metrics, server.slot_bytes)
            self.namespaces = Namespaces(cache, self.tiers, self.l1)
            self.sessions = Sessions()
            self.pool = cf.ThreadPoolExecutor(server.threads, thread_name_prefix="kvport-server")
            self.sock = self._bind()
            self.replies = self.ctx.socket(zmq.PULL)
            self._reply_addr = f"inproc://kvport-replies-{self.server_id}"
            self.replies.bind(self._reply_addr)
            from prometheus_client import REGISTRY

            REGISTRY.register(self.stats)
            self._collector_registered = True
        except BaseException:
            self._close_resources()
            raise

    # ---- setup -------------------------------------------------------------------------------------------
    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A frame larger than this drops its sender's connection inside libzmq: memory stays bounded whatever a
        # peer sends. Below it, oversized requests get an error reply (protocol limits).
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + P.MAX_HEADER_BYTES)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        address = self.config.address
        path = ipc_path(address)
        if path is not None:
            self._prepare_ipc(path)
            old = os.umask(0o177)  # the socket file starts owner-only, then gets the configured mode
            try:
                sock.bind(address)
            finally:
                os.umask(old)
            os.chmod(path, self.config.mode)
            self._chown(path)
        else:
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                sock.close()
                raise UserError(f"server: cannot listen on {address}: {exc}") from None
        return sock

    def _prepare_ipc(self, path: Path) -> None:
        if path.parent.is_dir():
            owner = path.parent.stat().st_uid
            if owner not in (os.getuid(), 0):  # someone else's directory could swap the socket under us
                raise UserError(f"server: {path.parent} belongs to uid {owner}; put the socket in a directory you own")
        else:
            dir_mode = 0o700 | (0o010 if self.config.mode & 0o060 else 0)  # group may reach a group socket
            path.parent.mkdir(mode=dir_mode, parents=True)
            self._chown(path.parent)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise UserError(f"server: another process is serving on {path}; stop it or pick another address")
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
                    raise UserError(f"server: {path}: {exc.strerror}") from None
                path.unlink(missing_ok=True)  # a socket left behind by a server that died
            finally:
                probe.close()

    def _chown(self, path: Path) -> None:
        if self.config.group is None:
            return
        try:
            gid = grp.getgrnam(self.config.group).gr_gid
        except KeyError:
            raise UserError(f"server config: group {self.config.group!r} does not exist") from None
        os.chown(path, -1, gid)

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

    # ---- ops ---------------------------------------------------------------------------------------------
    def _hello(self, request: P.Request, arg: tuple[bytes, zmq.Frame]):
        route, first = arg
        fields = request.fields
        if self.token is not None and not hmac.compare_digest(
            str(fields.get("token", "")).encode(), self.token.encode()
        ):
            raise P.ProtocolError("denied", "access denied: wrong or missing token")
        transport = fields["transport"]
        if transport not in P.TRANSPORTS:
            raise P.ProtocolError("malformed", f"unknown transport {transport[:20]!r}")
        try:
            kernel_pid = peer_pid(first.get("Peer-Address"))
        except zmq.ZMQError:
            kernel_pid = None
        pid = kernel_pid or fields["pid"]
        session = self.sessions.create(route, transport, fields.get("name", ""), pid, kernel_pid is not None)
        if transport == "shm" and session.start is None:
            self.sessions.drop(session)
            raise UserError(
                "shared memory needs a client process this server can see (same host and pid namespace); "
                "use server_transport: copy"
            )
        return {
            "session": session.sid,
            "server": self.server_id,
            "shm": str(self.arena.path),
            "shm_bytes": self.arena.nbytes,
            "ping_s": self.config.client_timeout_s / 4,
            "max_message_bytes": self.config.max_message_bytes,
        }, []

    def _op_ping(self, request, session):
        return {}, []

    def _op_bye(self, request, session):
        self.stats.inc("sessions_dropped", 1, "bye")
        self.sessions.drop(session)
        return {}, []

    def _op_open(self, request, session):
        f = request.fields
        ns = self.namespaces.open(f["ns"], f["chunk_tokens"], f["chunk_bytes"], f["fingerprint"])
        return {"slot_bytes": ns.l1.slot_bytes}, []

    def _op_lookup(self, request, session):
        ns = self.namespaces.get(request.fields["ns"])
        hits = ns.store.lookup_keys(request.keys)
        self.stats.inc("lookup_chunks", hits, "hit")
        self.stats.inc("lookup_chunks", len(request.keys) - hits, "miss")
        return {"chunks": hits}, []

    def _opened(self, name: str):
        ns = self.namespaces.get(name)
        if ns.l1 is None:
            raise P.ProtocolError("not_open", f"namespace {name[:80]} is not open: send open first")
        return ns

    def _room(self, session: Session, ns) -> int:
        """Slots this session may still take: its share of L1, and never the last slot."""
        share = max(1, int(ns.l1.num_slots * self.config.client_share))
        return max(0, min(share, ns.l1.num_slots - 1) - session.held)

    def _op_reserve(self, request, session):
        ns = self._opened(request.fields["ns"])
        keys = request.keys
        own = frozenset(keys)
        room = self._room(session, ns)
        leases: list[Lease] = []
        indices: list[int] = []
        for index in ns.store.absent(keys, request.fields["start"]):
            if len(leases) >= room:
                ns.store.metrics.inc("skipped", len(keys) - index, reason="client_share")
                break
            lease = ns.store.reserve(keys[index], protect=own)
            if lease is None:
                if ns.l1.contains(keys[index]):
                    continue
                break  # L1 full of pinned slots, or another client is writing this chunk right now
            leases.append(lease)
            indices.append(index)
        if not leases:
            return {"rid": 0, "idx": [], "off": []}, []
        rid = self.sessions.next_id()
        if not self.sessions.add_reservation(session, rid, Reservation(ns, leases, indices, time.monotonic())):
            ns.store.abort(leases)
            raise P.ProtocolError("no_session", "session ended")
        return {"rid": rid, "idx": indices, "off": [self.arena.offset_of(lease.buffer) for lease in leases]}, []

    def _op_commit(self, request, session):
        reservation = self.sessions.take_reservation(session, request.fields["rid"])
        if reservation is None:
            raise P.ProtocolError("unknown_reservation", "no such reservation (already settled or dropped)")
        ns, leases = reservation.ns, reservation.leases
        if not request.fields["ok"]:
            ns.store.abort(leases)
            ns.store.metrics.inc("failures", len(leases), tier="l1", reason="gather_error")
            return {"chunks": 0}, []
        if session.transport == "copy":
            if len(request.data) != len(leases) or any(len(d) != ns.chunk_bytes for d in request.data):
                ns.store.abort(leases)
                raise P.ProtocolError("malformed", f"commit: expected {len(leases)} chunks of {ns.chunk_bytes} bytes")
            import torch

            for lease, data in zip(leases, request.data):
                lease.buffer.copy_(torch.frombuffer(data, dtype=torch.uint8))
        elif request.data:
            ns.store.abort(leases)
            raise P.ProtocolError("malformed", "commit: chunk data on the shared-memory transport")
        nbytes = request.fields.get("nbytes", 0)
        if nbytes:
            ns.store.metrics.transfer("l1", "write", nbytes, request.fields.get("seconds", 0.0))
        tokens = len(leases) * ns.chunk_tokens
        ns.store.metrics.inc("tokens_stored", tokens)
        self.stats.inc("tokens", tokens, "stored")
        ns.store.admit(leases)
        return {"chunks": len(leases)}, []

    def _op_pin(self, request, session):
        ns = self._opened(request.fields["ns"])
        room = self._room(session, ns)
        leases: list[Lease] = []
        fetches = ns.store.fetch(request.keys[:room])
        try:
            for got in fetches:
                if not isinstance(got, Lease):  # a miss, or no free slot to read a tier's copy into
                    if got is NO_SLOT:
                        ns.store.metrics.inc("skipped", reason="l1_exhausted")
                    break
                leases.append(got)
        finally:
            fetches.close()
        if session.transport == "copy":
            data = [bytes(memoryview(lease.buffer.numpy())) for lease in leases]
            for lease in leases:
                lease.release()
            return {"pin": 0, "off": [], "chunks": len(leases)}, data
        if not leases:
            return {"pin": 0, "off": [], "chunks": 0}, []
        pin = self.sessions.next_id()
        if not self.sessions.add_pin(session, pin, ns, leases):
            for lease in leases:
                lease.release()
            raise P.ProtocolError("no_session", "session ended")
        return {"pin": pin, "off": [self.arena.offset_of(lease.buffer) for lease in leases], "chunks": len(leases)}, []

    def _op_release(self, request, session):
        entry = self.sessions.take_pin(session, request.fields["pin"])
        if entry is None:
            raise P.ProtocolError("unknown_pin", "no such pin (already released or dropped)")
        ns, leases, _ = entry
        for lease in leases:
            lease.release()
        self._count_load(ns, len(leases), request.fields)
        return {}, []

    def _count_load(self, ns, chunks: int, fields: dict) -> None:
        if not fields.get("ok", True):
            ns.store.metrics.inc("failures", chunks, tier="l1", reason="scatter_error")
            return
        tokens = chunks * ns.chunk_tokens
        ns.store.metrics.inc("tokens_loaded", tokens)
        self.stats.inc("tokens", tokens, "loaded")
        if fields.get("nbytes"):
            ns.store.metrics.transfer("l1", "read", fields["nbytes"], fields.get("seconds", 0.0))

    def _op_flush(self, request, session):
        deadline = time.monotonic() + request.fields.get("timeout", 60.0)
        for ns in self.namespaces.all():
            try:
                ns.store.flush(max(0.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                raise P.ProtocolError("timeout", str(exc)) from None
        return {}, []

    def _op_stats(self, request, session):
        out = self.stats.snapshot()
        out["namespaces_detail"] = {ns.name[:200]: ns.store.metrics.snapshot() for ns in self.namespaces.all()}
        out["server_metrics"] = self.metrics.snapshot()
        return {"stats": out}, []

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


def _remove_stale_arenas(shm_dir: str) -> None:
    """Shared memory left by servers that were killed (it would hold its memory until reboot)."""
    try:
        entries = list(Path(shm_dir).glob("kvport-*.l1"))
    except OSError:
        return
    for path in entries:
        pid = path.name.split("-")[1]
        try:
            owned = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
            log.info("kvport server: removed %s, left by a server that is gone", path)
