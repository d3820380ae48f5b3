"""Tickets: what an asynchronous load or store hands back to the engine adapter.
Owns the settle/wait protocol of one operation; must not decide what is cached or touch engine memory itself."""

from __future__ import annotations

import concurrent.futures as cf

from kvport.hal.completion import READY, Completion


class Ticket:
    """One submitted load or store.

    ``tokens`` is what it moves (known when it is submitted). ``completion`` is the device work: an engine orders
    its stream after it (``completion.wait_on()``) before its forward reads loaded blocks or reuses blocks a store
    gathers. ``wait()`` blocks the host until the cache settled too (a stored chunk committed to L1 and handed to
    the tiers, a load's L1 buffers released) and returns ``tokens``; ``done()`` never blocks."""

    def __init__(self, tokens: int, completion: Completion = READY) -> None:
        self.tokens = tokens
        self.completion = completion
        self._settled: cf.Future = cf.Future()

    @classmethod
    def settled(cls, tokens: int = 0) -> Ticket:
        ticket = cls(tokens)
        ticket.settle()
        return ticket

    def settle(self, error: BaseException | None = None) -> None:
        if error is None:
            self._settled.set_result(self.tokens)
        else:
            self._settled.set_exception(error)

    def done(self) -> bool:
        return self._settled.done()

    def on_settled(self, fn) -> None:
        """Run ``fn()`` once the ticket settled (at once if it has), whatever the outcome."""
        self._settled.add_done_callback(lambda _: fn())

    def wait(self, timeout: float | None = None) -> int:
        """Block until settled; re-raises the operation's error; TimeoutError after ``timeout`` seconds."""
        return int(self._settled.result(timeout))


class Handle:
    """A background job's result (prefetch): ``wait()`` returns its token count, ``done()`` never blocks."""

    def __init__(self, future: cf.Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        return int(self._future.result(timeout))
