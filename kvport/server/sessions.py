"""Client sessions of `kvport server`: who a client is (its process, from the kernel where possible), the L1 slots it
holds (reservations being filled, pins being read) and whether it is still alive. Owns lease bookkeeping and death
detection; must not decode messages or decide what is cached."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from pathlib import Path
from typing import Any

from kvport.server.protocol import ProtocolError
from kvport.store.l1 import Lease


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; None when no such process is visible). A pid
    and its start time name one process: a recycled pid has another start time."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def peer_pid(peer_address: str | None) -> int | None:
    """The pid libzmq read with SO_PEERCRED for an ipc peer ("<host>:<uid>:<gid>:<pid>"); None for TCP peers."""
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) == 4 and parts[3].isdigit() and parts[1].isdigit():
        return int(parts[3])
    return None


@dataclasses.dataclass
class Reservation:
    ns: Any  # the namespace's store entry
    leases: list[Lease]
    indices: list[int]
    started: float


@dataclasses.dataclass
class Session:
    sid: int
    routing_id: bytes
    transport: str
    name: str
    pid: int | None
    pid_verified: bool  # the pid came from the kernel (SO_PEERCRED), not from the client's word
    start: str | None  # process_start(pid) at hello; None when the process is not visible here
    last_seen: float
    reservations: dict[int, Reservation] = dataclasses.field(default_factory=dict)
    pins: dict[int, tuple[Any, list[Lease], float]] = dataclasses.field(default_factory=dict)
    held: int = 0  # slots reserved or pinned right now
    closed: bool = False

    def alive(self, now: float, timeout_s: float) -> bool:
        """Alive while its process is (same pid, same start time); a client whose process this server cannot see
        (only allowed on the copy transport, where it never writes L1 itself) while it keeps talking."""
        if self.start is not None:
            return process_start(self.pid) == self.start
        return now - self.last_seen < timeout_s


# Live sessions at most: a few per engine process (scheduler, one per rank) times many engines stays far below;
# past it a hello is refused, so connections cannot grow the server's memory without bound.
MAX_SESSIONS = 4096


class Sessions:
    """Every live session, by routing id. Thread-safe: requests that touch tiers run on worker threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._by_route: dict[bytes, Session] = {}
        self._ids = itertools.count(1)
        self.dropped = 0
        self.leases_dropped = 0

    def create(self, routing_id: bytes, transport: str, name: str, pid: int | None, verified: bool) -> Session:
        start = process_start(pid) if pid else None
        with self.lock:
            old = self._by_route.pop(routing_id, None)
            if old is not None:
                self._drop_locked(old)
            if len(self._by_route) >= MAX_SESSIONS:
                # Not the client's configuration: it serves without the server and retries (reason "busy").
                raise ProtocolError("busy", f"the server already has {MAX_SESSIONS} client sessions")
            session = Session(next(self._ids), routing_id, transport, name, pid, verified, start, time.monotonic())
            self._by_route[routing_id] = session
            return session

    def get(self, routing_id: bytes) -> Session | None:
        with self.lock:
            session = self._by_route.get(routing_id)
            if session is not None:
                session.last_seen = time.monotonic()
            return session

    def all(self) -> list[Session]:
        with self.lock:
            return list(self._by_route.values())

    def next_id(self) -> int:
        return next(self._ids)

    def add_reservation(self, session: Session, rid: int, reservation: Reservation) -> bool:
        """Record a reservation; False (the caller aborts it) when the session died meanwhile."""
        with self.lock:
            if session.closed:
                return False
            session.reservations[rid] = reservation
            session.held += len(reservation.leases)
            return True

    def take_reservation(self, session: Session, rid: int) -> Reservation | None:
        with self.lock:
            reservation = session.reservations.pop(rid, None)
            if reservation is not None:
                session.held -= len(reservation.leases)
            return reservation

    def add_pin(self, session: Session, pin: int, ns: Any, leases: list[Lease]) -> bool:
        with self.lock:
            if session.closed:
                return False
            session.pins[pin] = (ns, leases, time.monotonic())
            session.held += len(leases)
            return True

    def take_pin(self, session: Session, pin: int) -> tuple[Any, list[Lease], float] | None:
        with self.lock:
            entry = session.pins.pop(pin, None)
            if entry is not None:
                session.held -= len(entry[1])
            return entry

    def drop(self, session: Session) -> int:
        """Forget a session: its reservations are aborted (nothing it half-wrote becomes visible) and its pins
        released. Returns the leases dropped."""
        with self.lock:
            if self._by_route.get(session.routing_id) is session:
                del self._by_route[session.routing_id]
            return self._drop_locked(session)

    def _drop_locked(self, session: Session) -> int:
        if session.closed:
            return 0
        session.closed = True
        count = 0
        for reservation in session.reservations.values():
            reservation.ns.store.abort(reservation.leases)
            count += len(reservation.leases)
        for _, leases, _ in session.pins.values():
            for lease in leases:
                lease.release()
            count += len(leases)
        session.reservations.clear()
        session.pins.clear()
        session.held = 0
        self.dropped += 1
        self.leases_dropped += count
        return count

    def reap(self, timeout_s: float) -> list[tuple[Session, int]]:
        """Drop every session whose client is gone; (session, leases dropped) for each."""
        now = time.monotonic()
        out = []
        for session in self.all():
            if not session.alive(now, timeout_s):
                out.append((session, self.drop(session)))
        return out
