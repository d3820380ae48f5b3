"""A client's connection to `kvport server`: request/reply over one ZMQ DEALER socket, with a timeout, pings, and a
background thread that reconnects after the server went away. Owns the connection state and its counters; must
not know chunks, keys or devices (the facade in kvport.server.remote does)."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from kvport.errors import UserError
from kvport.server import protocol as P

log = logging.getLogger("kvport.server.client")

RETRY_S = 0.5  # pause between reconnect attempts while the server is down
# Reasons a hello is refused that no retry can fix: the client's configuration is wrong.
CONFIG_REASONS = ("denied", "refused", "version")


class ServerUnavailable(Exception):
    """The server did not answer (down, restarting, not reachable): the caller treats it as a miss."""


class ServerError(Exception):
    """The server refused a request; ``reason`` is its label (e.g. not_open, malformed)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class Connection:
    """Thread-safe. ``start()`` tries once to connect, then a daemon thread keeps the connection: it reconnects
    while the server is down and pings while it is idle (the server drops clients it can neither see nor hear).
    ``on_connect(info, call)`` runs after every successful hello, before any other request uses the new session
    (``call`` is ``call`` for that session while it is not yet open to others)."""

    def __init__(
        self,
        address: str,
        token: str | None,
        transport: str,
        timeout_ms: int,
        name: str,
        on_connect: Callable[[dict, Callable[..., tuple[dict, list]]], None] | None = None,
    ) -> None:
        self.address, self.token, self.transport, self.timeout_ms, self.name = (
            address,
            token,
            transport,
            timeout_ms,
            name,
        )
        self.on_connect = on_connect
        self.info: dict[str, Any] | None = None
        self.up = False
        self.counters = {"unavailable": 0, "disconnects": 0, "connects": 0, "errors": 0}
        self.last_error = ""
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._last_sent = 0.0
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """One connection attempt now (a refused hello is a UserError: wrong token, transport or address), then
        the keeper thread. A server that does not answer is not an error: the keeper keeps trying."""
        _check_socket_access(self.address)
        try:
            self._connect()
        except ServerUnavailable as exc:
            log.warning("kvport: server %s not reachable (%s); serving without it until it answers", self.address, exc)
        except ServerError as exc:
            raise UserError(f"kvport server {self.address}: {exc}") from None
        self._thread = threading.Thread(target=self._keep, name="kvport-server-conn", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.up:
            try:
                self.call("bye", timeout_ms=min(self.timeout_ms, 200))
            except (ServerUnavailable, ServerError):
                pass
        self._closed.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with self._lock:
            self._drop_socket()
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None

    # ---- requests ----------------------------------------------------------------------------------------
    def call(
        self, op: str, fields: dict[str, Any] | None = None, frames: Sequence[Any] = (), timeout_ms: int | None = None
    ) -> tuple[dict, list]:
        """Send one request and wait for its reply: (header, data frames). ServerUnavailable when the server is
        down or does not answer in time (the connection is then marked down), ServerError when it refuses."""
        # Checked before the lock too: a reconnect attempt holds the lock for up to a timeout, and a caller on the
        # engine's critical path must get its miss at once meanwhile.
        if not self.up:
            self.counters["unavailable"] += 1
            raise ServerUnavailable(self.last_error or "not connected")
        with self._lock:
            if not self.up:
                self.counters["unavailable"] += 1
                raise ServerUnavailable(self.last_error or "not connected")
            return self._call_locked(op, fields, frames, timeout_ms)

    def _internal_call(self, op, fields=None, frames=(), timeout_ms=None) -> tuple[dict, list]:
        return self._call_locked(op, fields, frames, timeout_ms)

    def _call_locked(self, op, fields, frames, timeout_ms) -> tuple[dict, list]:
        if os.getpid() != self._pid:  # forked: the parent's socket is not ours to use
            self._pid, self._sock, self._ctx, self.up = os.getpid(), None, None, False
            raise ServerUnavailable("process forked; reconnecting")
        rid = next(self._ids)
        header = {"v": P.VERSION, "op": op, "id": rid, **(fields or {})}
        sock = self._sock
        try:
            sock.send_multipart(P.encode(header, frames), copy=False)
            self._last_sent = time.monotonic()
            deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    self._mark_down(f"no reply to {op} within {timeout_ms or self.timeout_ms} ms")
                    raise ServerUnavailable(self.last_error)
                reply, data = P.decode_reply(sock.recv_multipart())
                if reply.get("id") == rid:
                    break  # an older id is the late reply of a request that timed out: skip it
        except zmq.ZMQError as exc:
            self._mark_down(f"{op}: {exc}")
            raise ServerUnavailable(self.last_error) from None
        except P.ProtocolError as exc:
            self._mark_down(f"{op}: bad reply ({exc})")
            raise ServerUnavailable(self.last_error) from None
        if "error" in reply:
            reason = str(reply.get("reason", "error"))
            if reason == "no_session":  # the server restarted: this session is gone, a new hello is needed
                self._mark_down("server restarted")
                raise ServerUnavailable(self.last_error)
            self.counters["errors"] += 1
            raise ServerError(reason, str(reply["error"]))
        return reply, data

    # ---- connection --------------------------------------------------------------------------------------
    def _connect(self) -> None:
        with self._lock:
            self._drop_socket()
            if self._ctx is None:
                self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)  # a send never blocks longer than a reply may take
            sock.connect(self.address)
            self._sock = sock
            fields = {"transport": self.transport, "pid": os.getpid(), "name": self.name[:200]}
            if self.token is not None:
                fields["token"] = self.token
            try:
                info, _ = self._call_locked("hello", fields, (), None)
            except ServerError as exc:
                self._drop_socket()
                self.last_error = str(exc)
                if exc.reason not in CONFIG_REASONS:
                    raise ServerUnavailable(str(exc)) from None
                raise
            self.info = info
            try:
                if self.on_connect is not None:
                    self.on_connect(info, self._internal_call)
            except BaseException:
                self._drop_socket()
                raise
            was_down = bool(self.last_error)
            self.up = True
            self.counters["connects"] += 1
            self.last_error = ""
            if was_down:
                log.warning("kvport: connected to server %s (connection %d)", self.address, self.counters["connects"])

    def _mark_down(self, why: str) -> None:
        if self.up:
            self.counters["disconnects"] += 1
            log.warning("kvport: server %s unavailable (%s); misses until it answers again", self.address, why)
        self.up = False
        self.last_error = why
        self._drop_socket()
        self._wake.set()

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _keep(self) -> None:
        while not self._closed.is_set():
            if not self.up:
                try:
                    self._connect()
                except (ServerUnavailable, ServerError, UserError) as exc:
                    if isinstance(exc, UserError) and str(exc) != self.last_error:
                        log.error("kvport: %s (serving without the server until this is fixed)", exc)
                    self.last_error = str(exc)
                except Exception:  # a bug: log it, keep trying (the engine must keep serving)
                    log.exception("kvport: reconnecting to %s failed", self.address)
                self._wake.wait(RETRY_S)
                self._wake.clear()
                continue
            ping_s = float((self.info or {}).get("ping_s", 2.0))
            self._wake.wait(ping_s)
            self._wake.clear()
            if self.up and time.monotonic() - self._last_sent >= ping_s:
                try:
                    self.call("ping")
                except (ServerUnavailable, ServerError):
                    pass


def _check_socket_access(address: str) -> None:
    """A UserError when this process may not connect to an ipc socket (its mode or directory keeps us out); a
    socket that is merely absent or not listening is a server that is down, not an error."""
    import errno

    from kvport.server.address import probe_ipc

    error = probe_ipc(address)
    if error is not None and error.errno in (errno.EACCES, errno.EPERM):
        raise UserError(
            f"kvport server {address}: permission denied on its socket (the server's mode and group decide "
            "who may connect)"
        )
