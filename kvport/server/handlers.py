"""The requests `kvport server` answers (hello, lookup, reserve/commit, pin/release, flush, stats): each checks its
session and namespace and returns (reply header, data frames). Owns the store/load protocol's rules (what a client
may hold, when a chunk becomes visible); must not touch sockets or block on a client."""

from __future__ import annotations

import hmac
import time

import zmq

from kvport.errors import UserError
from kvport.server import protocol as P
from kvport.server.sessions import Reservation, Session, peer_pid
from kvport.store.l1 import Lease
from kvport.store.read_ahead import NO_SLOT


class RequestHandlers:
    """Mixed into kvport.server.service.Server, whose state (config, token, arena, namespaces, sessions, stats) the
    handlers use; ``_op_<name>(request, session)`` per op."""

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
            for lease, data in zip(leases, request.data):
                lease.buffer.numpy()[:] = memoryview(data).cast("B")  # the frame is read-only: copy, no tensor view
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
