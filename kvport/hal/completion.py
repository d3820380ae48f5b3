"""Completions: what every gather, scatter and transfer returns, so nothing reads memory a device is still writing.
Owns the completion types and the one watcher thread that runs their callbacks; must not issue copies itself.

A completion is finished when the device work it stands for has finished. Three ways to wait on it:
``wait()`` blocks the host; ``wait_on(stream)`` orders a device stream after the work's use of engine memory without
blocking the host (what an engine does before its forward reads loaded blocks or overwrites blocks a store read:
for a staged store that is the end of its gather, before the copy to the host has run); ``add_done_callback(fn)``
runs ``fn(error)`` once all of it finished (on the watcher thread), which is how the cache commits a gathered chunk
or frees a buffer a scatter read. ``wait_on_all(stream)`` orders a stream after all of it (a benchmark timing a
store to its last byte)."""

from __future__ import annotations

import abc
import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

Callback = Callable[[BaseException | None], None]


class Completion(abc.ABC):
    """The end of some (possibly asynchronous) device work."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once the work finished (never blocks)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block the host until the work finished; re-raises its error; TimeoutError after ``timeout`` seconds."""

    @abc.abstractmethod
    def wait_on(self, stream: Any = None) -> None:
        """Order ``stream`` (default: the device's current stream) after the work's use of engine memory, without
        blocking the host. Host buffers a store fills are final only once the completion is done."""

    def wait_on_all(self, stream: Any = None) -> None:
        """Order ``stream`` after all of the work, host buffers included, without blocking the host."""
        self.wait_on(stream)

    @abc.abstractmethod
    def add_done_callback(self, fn: Callback) -> None:
        """Run ``fn(None)`` once the work finished, or ``fn(error)`` if it failed; exactly once."""


class Ready(Completion):
    """Work that finished before it returned (synchronous backends and platforms), or failed with ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error

    def wait_on(self, stream: Any = None) -> None:
        return None

    def add_done_callback(self, fn: Callback) -> None:
        fn(self.error)


READY = Ready()


class EventCompletion(Completion):
    """Device work that ends at ``event`` (recorded on a stream of ``platform``) and is done with engine memory at
    ``released`` (default: ``event``; a staged store's gather ends before its copy to the host); ``keepalive`` holds
    the buffers the work reads or writes until it finished, so none is freed under a running copy.

    ``event`` and ``released`` are plain events, which streams wait on. The watcher thread sleeps on a host event
    instead (``host_event``): recorded on ``stream`` when the first callback is added, it follows the work there (or
    later work on that stream: a callback may run late, never early). Streams never wait on it; a cross-stream wait
    on such an event costs device time (kvport.hal.platforms.base.StreamPlatform.new_event)."""

    def __init__(
        self, platform, device, event, keepalive: Sequence[Any] = (), released=None, stream: Any = None
    ) -> None:
        self.platform, self.device, self.event = platform, device, event
        self.released = event if released is None else released
        self._stream = stream  # where ``event`` was recorded: a host event for the watcher is recorded there too
        self._host_event = None
        self._keepalive = list(keepalive)
        self._lock = threading.Lock()
        self._finished = False
        self._error: BaseException | None = None
        self._callbacks: list[Callback] = []

    def done(self) -> bool:
        if self._finished:
            return True
        try:
            if not self.event.query():
                return False
        except Exception as exc:  # a device error surfaces on the first query after it
            self._finish(exc)
            return True
        self._finish(None)
        return True

    def wait(self, timeout: float | None = None) -> None:
        if not self._finished:
            if timeout is None:
                try:
                    self.event.synchronize()
                    self._finish(None)
                except Exception as exc:
                    self._finish(exc)
            else:
                deadline = time.monotonic() + timeout
                while not self.done():
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"device work not finished after {timeout} s")
                    time.sleep(50e-6)
        if self._error is not None:
            raise self._error

    def wait_on(self, stream: Any = None) -> None:
        (stream or self.platform.current_stream(self.device)).wait_event(self.released)

    def wait_on_all(self, stream: Any = None) -> None:
        (stream or self.platform.current_stream(self.device)).wait_event(self.event)

    def add_done_callback(self, fn: Callback) -> None:
        with self._lock:
            if not self._finished:
                first = not self._callbacks
                self._callbacks.append(fn)
                if first:
                    self._record_host_event()
                    _watcher().watch(self)
                return
        fn(self._error)

    def _record_host_event(self) -> None:
        if self._stream is not None and self._host_event is None:
            self._host_event = self.platform.new_host_event()
            self._host_event.record(self._stream)

    def host_event(self):
        """The event a host thread sleeps on until the work finished: the host event if one was recorded, else the
        plain ``event`` (whose ``synchronize`` spins)."""
        return self._host_event if self._host_event is not None else self.event

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished, self._error = True, error
            callbacks, self._callbacks = self._callbacks, []
            self._keepalive.clear()
        for fn in callbacks:
            _run_callback(fn, error)


class AllOf(Completion):
    """Several completions as one: finished when every part has."""

    def __init__(self, parts: Sequence[Completion]) -> None:
        self.parts = [p for p in parts if p is not READY]

    def done(self) -> bool:
        return all(p.done() for p in self.parts)

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for part in self.parts:
            part.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def wait_on(self, stream: Any = None) -> None:
        for part in self.parts:
            part.wait_on(stream)

    def wait_on_all(self, stream: Any = None) -> None:
        for part in self.parts:
            part.wait_on_all(stream)

    def add_done_callback(self, fn: Callback) -> None:
        if not self.parts:
            fn(None)
            return
        lock = threading.Lock()
        state = {"left": len(self.parts), "error": None}

        def one(error: BaseException | None) -> None:
            with lock:
                state["left"] -= 1
                state["error"] = state["error"] or error
                last = state["left"] == 0
            if last:
                fn(state["error"])

        for part in self.parts:
            part.add_done_callback(one)


def all_of(parts: Sequence[Completion]) -> Completion:
    """One completion for ``parts`` (READY when there is nothing to wait for)."""
    pending = [p for p in parts if p is not READY]
    if not pending:
        return READY
    return pending[0] if len(pending) == 1 else AllOf(pending)


def _run_callback(fn: Callback, error: BaseException | None) -> None:
    try:
        fn(error)
    except Exception:  # a callback's failure must not stop the watcher (it would strand every later completion)
        import logging

        logging.getLogger("kvport.completion").exception("kvport: completion callback failed")


class _Watcher:
    """One daemon thread per process that waits for event completions in the order they were registered and runs
    their callbacks. In order is enough: transfers finish roughly in issue order, and a callback that waits a
    little longer only delays a commit, never correctness."""

    def __init__(self) -> None:
        self._queue: collections.deque[EventCompletion] = collections.deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="kvport-completions", daemon=True)
        self._thread.start()

    def watch(self, completion: EventCompletion) -> None:
        with self._cond:
            self._queue.append(completion)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                completion = self._queue.popleft()
            try:
                completion.host_event().synchronize()
                completion._finish(None)
            except Exception as exc:
                completion._finish(exc)


_watcher_lock = threading.Lock()
_the_watcher: _Watcher | None = None


def _watcher() -> _Watcher:
    global _the_watcher
    with _watcher_lock:
        if _the_watcher is None:
            _the_watcher = _Watcher()
        return _the_watcher


def completion_after(device, keepalive: Sequence[Any] = ()) -> Completion:
    """A completion for the work issued so far on ``device``'s current stream: an event there on platforms with
    streams; on synchronous platforms the work already finished (after a device sync where the platform needs one)."""
    from kvport.hal.platforms import platform_for_device

    platform = platform_for_device(device)
    if not platform.async_copies:
        platform.synchronize(device)
        return READY
    stream = platform.current_stream(device)
    event = platform.new_event()
    event.record(stream)
    return EventCompletion(platform, device, event, keepalive, stream=stream)
