"""What every networked tier shares (Redis, Mooncake, a future S3): one batched call per request on a bounded pool, a
time bound on every call a request waits for, down/up state with background reconnects, URL redaction, per-tier counts.
Owns the failure policy of remote tiers; must not know a client library or a wire format, nor raise into the data path.

A remote tier never makes a request wait for a server that is gone: while it is down every call answers at once
(lookups 0, reads UNAVAILABLE, stores dropped) and one background attempt per ``retry_interval`` reconnects it."""

from __future__ import annotations

import abc
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvport.errors import UserError
from kvport.store.tiers.base import ReadResult, Tier, check_keys

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

_log = logging.getLogger("kvport.store")
# Default bound on any call a request waits for. A prefill that caching saves takes 0.1-10 s (a 4k-token prompt on an
# 8B model is ~0.3 s on an H100); a lookup or a read-ahead batch on a healthy server takes 0.1-20 ms (loopback Redis,
# 1 MiB chunks, this VM): 0.5 s never fires on a working server and still gives up long before recomputing would.
DEFAULT_TIMEOUT_S = 0.5
# A tier that failed is retried (one background attempt) this often.
DEFAULT_RETRY_S = 1.0
REMOTE_OPTIONS = ("timeout", "retry_interval", "threads")
_SECRET_PARAMS = ("password", "pass", "token", "secret", "key")


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret-looking query value) replaced by ``***``, for logs and errors."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return "<unparsable url>"
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user, sep, _ = creds.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{host}" if user else f"***@{host}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, eq, _ = pair.partition("=")
            secret = any(s in name.lower() for s in _SECRET_PARAMS)
            pairs.append(f"{name}=***" if eq and secret else pair)
        query = "&".join(pairs)
    return parts._replace(netloc=netloc, query=query).geturl()


def parse_remote_options(opts: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``timeout`` (s), ``retry_interval`` (s) and ``threads`` of a remote tier spec, checked."""
    from kvport.cache.config import coerce_positive_int

    return {
        "timeout_s": positive_seconds(opts.get("timeout", DEFAULT_TIMEOUT_S), f"{where}: timeout"),
        "retry_s": positive_seconds(opts.get("retry_interval", DEFAULT_RETRY_S), f"{where}: retry_interval"),
        "threads": coerce_positive_int(opts.get("threads", 2), f"{where}: threads"),
    }


def positive_seconds(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number of seconds") from None
    if not 0 < seconds < 86400 * 365:  # also refuses nan and inf
        raise UserError(f"{where}: {value!r}, expected a positive number of seconds")
    return seconds


class TierDown(Exception):
    """Raised by a client hook when the server cannot be reached (the tier goes down and reconnects later); any other
    exception is an error of that one call."""


class RemoteTier(Tier):
    """A tier behind a network client. Subclasses implement the one-round-trip hooks (``_open``, ``_exists``,
    ``_read``, ``_write``, ``_remove``, ``_close_client``); this class runs them, bounds them and keeps the state."""

    # True when the client bounds its own calls (socket timeouts): lookups then run on the caller's thread.
    inline_bounded = False

    def __init__(self, url: str, timeout_s: float, retry_s: float, threads: int, metrics: CacheMetrics | None) -> None:
        self.url = redact_url(url)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.metrics = metrics
        self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix=f"kvport-{self.kind}")
        # Lookups of a client that cannot bound its own calls get their own thread: never queued behind data calls.
        self._lookups = cf.ThreadPoolExecutor(1, thread_name_prefix=f"kvport-{self.kind}-lookup")
        self._lock = threading.Lock()
        self._state = "connecting"
        self._reason = "not connected yet"
        self._retry_at = 0.0
        self._connecting = False
        # id -> start of the lookups and reads running now: one a request has waited on for longer than timeout_s means
        # the server is stuck (stores are not watched: nobody waits on them, and a big one may take long).
        self._running: dict[int, float] = {}
        self._inflight = 0  # every call inside the client now (close() waits for them before closing it)
        self._queued: dict[int, tuple[list[cf.Future], Any]] = {}  # calls not finished: settled by close() if dropped
        self._closed = False

    # ---- client hooks -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> None:
        """Connect (blocking, may take long); raise on failure. Runs on a background thread."""

    @abc.abstractmethod
    def _exists(self, keys: Sequence[str]) -> list[bool]: ...

    @abc.abstractmethod
    def _read(self, keys: Sequence[str], fingerprint: str, dsts: Sequence[torch.Tensor]) -> list[ReadResult]: ...

    @abc.abstractmethod
    def _write(self, keys: Sequence[str], fingerprint: str, srcs: Sequence[torch.Tensor]) -> list[bool | None]: ...

    @abc.abstractmethod
    def _remove(self, keys: Sequence[str]) -> None: ...

    def _close_client(self) -> None:
        return None

    # ---- state ----------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        state = "up" if self._state == "up" else f"{self._state}: {self._reason}"
        return f"{self.kind} {self.url} ({state})"

    def stats(self) -> dict[str, Any]:
        return {"available": self._state == "up", "state": self._state, "reason": self._reason}

    @property
    def available(self) -> bool:
        return self._state == "up"

    def start(self) -> None:
        """First connection attempt, in the background: construction never waits for a server."""
        self._available()

    def _available(self) -> bool:
        """True when calls may go to the server; otherwise starts a background reconnect if one is due."""
        if self._state == "up":
            if not self._running:
                return True
            with self._lock:
                oldest = min(self._running.values(), default=time.monotonic())
            if time.monotonic() - oldest <= self.timeout_s:
                return True
            self._down(f"a call has had no answer for more than {self.timeout_s:g} s")
            return False
        with self._lock:
            due = not self._connecting and not self._closed and time.monotonic() >= self._retry_at
            if due:
                self._connecting = True
        if due:
            threading.Thread(target=self._reconnect, name=f"kvport-{self.kind}-connect", daemon=True).start()
        return False

    def _reconnect(self) -> None:
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001 - any failure to connect leaves the tier down, said once
            self._down(_why(exc), connecting=True)
            return
        finally:
            with self._lock:
                self._connecting = False
        with self._lock:
            was, self._state, self._reason = self._state, "up", ""
        if was == "down":
            _log.warning("kvport: %s %s answers again; using it", self.kind, self.url)

    def _down(self, reason: str, connecting: bool = False) -> None:
        with self._lock:
            first = self._state == "up" or (self._state == "connecting" and self._reason == "not connected yet")
            self._state = "down"
            self._reason = reason
            self._retry_at = time.monotonic() + self.retry_s
            if connecting:
                self._connecting = False
        if first and self.metrics is not None:
            self.metrics.inc("failures", tier=self.kind, reason="went_down")
        if first:
            _log.warning(
                "kvport: %s %s unavailable (%s): loads miss and stores are dropped; retrying every %g s",
                self.kind,
                self.url,
                reason,
                self.retry_s,
            )

    def _guarded(self, fn: Callable[[], Any], watched: bool = True) -> Any:
        """Run one client call, turning TierDown into the down state (re-raised for the caller to map)."""
        token = object()
        with self._lock:
            self._inflight += 1
            if watched:
                self._running[id(token)] = time.monotonic()
        try:
            return fn()
        except TierDown as exc:
            self._down(str(exc))
            raise
        finally:
            with self._lock:
                self._inflight -= 1
                self._running.pop(id(token), None)

    # ---- the Tier API ---------------------------------------------------------------------------------------------
    def contains_prefix(self, keys: Sequence[str]) -> int:
        check_keys(keys)
        if not keys or not self._available():
            return 0
        try:
            if self.inline_bounded:
                found = self._guarded(lambda: self._exists(keys))
            else:
                future = self._lookups.submit(self._guarded, lambda: self._exists(keys))
                try:
                    found = future.result(self.timeout_s)
                except cf.TimeoutError:
                    self._down(f"a lookup had no answer in {self.timeout_s:g} s")
                    return 0
        except TierDown:
            return 0
        except Exception as exc:  # noqa: BLE001 - one failed lookup is a miss, counted and logged
            self._count("failures", 1, "lookup_error")
            _log.warning("kvport: %s %s: lookup failed: %s", self.kind, self.url, _why(exc))
            return 0
        count = 0
        for present in found:
            if not present:
                break
            count += 1
        return count

    def get(self, keys, fingerprint, dsts) -> list[cf.Future]:
        check_keys(keys)
        futures = [cf.Future() for _ in keys]
        if not keys:
            return futures
        if not self._available():
            self._count("failures", len(keys), ReadResult.UNAVAILABLE.value)
            return _settle(futures, [ReadResult.UNAVAILABLE] * len(keys))
        self._submit(self._run_get, list(keys), fingerprint, list(dsts), futures, ReadResult.UNAVAILABLE)
        return futures

    def put(self, keys, fingerprint, srcs) -> list[cf.Future]:
        check_keys(keys)
        futures = [cf.Future() for _ in keys]
        if not keys:
            return futures
        if not self._available():
            self._count("skipped", len(keys), "dropped")
            return _settle(futures, [False] * len(keys))
        self._submit(self._run_put, list(keys), fingerprint, list(srcs), futures, False)
        return futures

    def _submit(self, run, keys, fingerprint, buffers, futures, if_dropped) -> None:
        token = object()
        with self._lock:
            self._queued[id(token)] = (futures, if_dropped)

        def call() -> None:
            with self._lock:  # started: from here on the call settles its own futures
                queued = self._queued.pop(id(token), None) is not None
                closed = self._closed
            if not queued:
                return  # close() already answered it
            if closed:
                _settle(futures, [if_dropped] * len(futures))
                return
            run(keys, fingerprint, buffers, futures)

        try:
            self._pool.submit(call)
        except RuntimeError:  # closed meanwhile
            with self._lock:
                self._queued.pop(id(token), None)
            _settle(futures, [if_dropped] * len(futures))

    def delete(self, keys) -> None:
        check_keys(keys)
        if keys and self._available():
            try:
                self._guarded(lambda: self._remove(keys), watched=False)
            except Exception as exc:  # noqa: BLE001 - a chunk left behind is only space: its reader validates it
                _log.warning("kvport: %s %s: delete failed: %s", self.kind, self.url, _why(exc))

    def _run_get(self, keys, fingerprint, dsts, futures) -> None:
        start = time.perf_counter()
        try:
            if not self._available():
                results = [ReadResult.UNAVAILABLE] * len(keys)
            else:
                results = self._guarded(lambda: self._read(keys, fingerprint, dsts))
        except TierDown:
            results = [ReadResult.IO_ERROR] * len(keys)
        except Exception as exc:  # noqa: BLE001 - a failed read is a miss for this request, counted and logged
            _log.warning("kvport: %s %s: read of %d chunks failed: %s", self.kind, self.url, len(keys), _why(exc))
            results = [ReadResult.IO_ERROR] * len(keys)
        elapsed = time.perf_counter() - start
        hit_bytes = sum(d.numel() for d, r in zip(dsts, results) if r is ReadResult.HIT)
        if hit_bytes:
            self._record("read", hit_bytes, elapsed)
        for result in results:
            if result not in (ReadResult.HIT, ReadResult.MISS):
                self._count("failures", 1, result.value)
        _settle(futures, results)

    def _run_put(self, keys, fingerprint, srcs, futures) -> None:
        start = time.perf_counter()
        try:
            if not self._available():
                stored = [False] * len(keys)
            else:
                stored = self._guarded(lambda: self._write(keys, fingerprint, srcs), watched=False)
        except TierDown:
            stored = [False] * len(keys)
        except Exception as exc:  # noqa: BLE001 - a failed store is dropped, counted and logged
            _log.warning("kvport: %s %s: store of %d chunks failed: %s", self.kind, self.url, len(keys), _why(exc))
            stored = [False] * len(keys)
        written = sum(s.numel() for s, ok in zip(srcs, stored) if ok)
        if written:
            self._record("write", written, time.perf_counter() - start)
        dropped = sum(1 for ok in stored if ok is False)
        if dropped:
            self._count("skipped", dropped, "dropped")
        _settle(futures, stored)

    def _record(self, op: str, nbytes: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.transfer(self.kind, op, nbytes, seconds)
            self.metrics.observe("latency", seconds, op=f"{self.kind}_{op}")

    def _count(self, name: str, n: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(name, n, tier=self.kind, reason=reason)

    def close(self) -> None:
        """Stop the pool; the client is closed only once no call is inside it (a stuck call keeps it, logged)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._lookups.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            dropped = list(self._queued.values())
            self._queued.clear()
        for futures, if_dropped in dropped:  # calls that never started: nobody may wait on them forever
            _settle(futures, [if_dropped] * len(futures))
        deadline = time.monotonic() + 2 * self.timeout_s + 1.0
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._inflight:
            _log.warning("kvport: %s %s: a call is still running at close; client left open", self.kind, self.url)
            return
        try:
            self._close_client()
        except Exception as exc:  # noqa: BLE001 - closing a broken connection must not fail the engine's shutdown
            _log.debug("kvport: %s %s: close: %s", self.kind, self.url, _why(exc))


def _settle(futures: list[cf.Future], values: Sequence[Any]) -> list[cf.Future]:
    for future, value in zip(futures, values, strict=True):
        if not future.done():
            future.set_result(value)
    return futures


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
