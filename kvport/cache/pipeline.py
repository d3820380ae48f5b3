"""The async pipeline: handles for background loads/stores, and in-order chunk fetching with bounded read-ahead.
Owns threading and ordering; must not decide what is cached (the engine does) or touch engine memory itself."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class Handle:
    """The result of an async load/store: ``wait()`` returns the tokens loaded/stored, ``done()`` never blocks."""

    def __init__(self, future: cf.Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Block until finished; re-raises the operation's exception; TimeoutError after ``timeout`` seconds."""
        return int(self._future.result(timeout))


class BoundedSubmitter:
    """Runs jobs on an executor with at most ``limit`` outstanding; ``try_submit`` refuses instead of blocking,
    so a full queue degrades to dropping work rather than stalling the caller (the engine's step)."""

    def __init__(self, executor: cf.Executor, limit: int) -> None:
        self._executor = executor
        self._limit = limit
        self._lock = threading.Lock()
        self._pending: set[cf.Future] = set()

    def try_submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future | None:
        with self._lock:
            if len(self._pending) >= self._limit:
                return None
            future = self._executor.submit(fn, *args)
            self._pending.add(future)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: cf.Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the jobs outstanding now; TimeoutError when some are still running after ``timeout`` seconds."""
        with self._lock:
            futures = list(self._pending)
        _, not_done = cf.wait(futures, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} background jobs still pending after {timeout} s")

    def drop(self) -> int:
        """Cancel every job not started yet; returns how many were cancelled (running ones finish whole)."""
        with self._lock:
            futures = list(self._pending)
        return sum(1 for f in futures if f.cancel())


def fetch_in_order(
    items: Sequence[Any],
    fetch: Callable[[Any], Any],
    executor: cf.Executor | None,
    depth: int,
    release: Callable[[Any], None],
) -> Iterator[Any]:
    """Yield ``fetch(item)`` for items in order, running up to ``depth`` fetches ahead on ``executor``
    (inline when None). When the consumer stops early (a miss), results fetched ahead are handed to
    ``release`` so nothing stays pinned."""
    if executor is None:
        for item in items:
            yield fetch(item)
        return
    window: deque[cf.Future] = deque()
    next_item = 0
    try:
        while True:
            while next_item < len(items) and len(window) < depth:
                window.append(executor.submit(fetch, items[next_item]))
                next_item += 1
            if not window:
                return
            yield window.popleft().result()
    finally:
        for future in window:
            if not future.cancel():
                future.add_done_callback(lambda f: f.exception() is None and release(f.result()))
