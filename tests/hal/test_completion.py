"""Completion semantics on the host: where ``wait_on`` and ``wait_on_all`` order a stream, callbacks run once with
the work's error, AllOf and READY. Events and streams are small recorders of what was asked of them."""

from __future__ import annotations

import threading

import pytest

from kvport.hal.completion import READY, AllOf, EventCompletion, Ready, all_of


class Event:
    """The device work it stands for ends when ``gate`` is set (or at once with ``finished``)."""

    def __init__(self, finished: bool = False, error: Exception | None = None) -> None:
        self.finished, self.error = finished, error
        self.gate = threading.Event()

    def query(self) -> bool:
        if self.gate.is_set() and self.error is not None:
            raise self.error
        return self.finished or self.gate.is_set()

    def synchronize(self) -> None:
        self.gate.wait(5)
        if self.error is not None:
            raise self.error
        self.finished = True


class Stream:
    def __init__(self) -> None:
        self.waited: list = []

    def wait_event(self, event) -> None:
        self.waited.append(event)


class Platform:
    def __init__(self) -> None:
        self.stream = Stream()

    def current_stream(self, device):
        return self.stream


def test_wait_on_orders_after_the_release_and_wait_on_all_after_the_end():
    platform, end, released = Platform(), Event(), Event()
    completion = EventCompletion(platform, "dev", end, released=released)
    completion.wait_on()
    completion.wait_on_all()
    assert platform.stream.waited == [released, end]
    other = Stream()
    completion.wait_on(other)
    assert other.waited == [released]


def test_without_a_release_point_both_wait_for_the_end():
    platform, end = Platform(), Event()
    completion = EventCompletion(platform, "dev", end)
    completion.wait_on()
    completion.wait_on_all()
    assert platform.stream.waited == [end, end]


def test_all_of_orders_every_part_and_ready_orders_nothing():
    platform = Platform()
    ends, releases = [Event(), Event()], [Event(), Event()]
    parts = [EventCompletion(platform, "dev", e, released=r) for e, r in zip(ends, releases)]
    combined = all_of([READY, *parts])
    assert isinstance(combined, AllOf)
    combined.wait_on()
    assert platform.stream.waited == releases
    platform.stream.waited.clear()
    combined.wait_on_all()
    assert platform.stream.waited == ends
    assert all_of([READY]) is READY
    READY.wait_on_all(platform.stream)
    assert platform.stream.waited == ends


def test_callbacks_run_once_with_the_works_error_and_keepalive_is_dropped():
    platform = Platform()
    ok, failing = Event(), Event(error=RuntimeError("device fault"))
    keep = [object()]
    done = EventCompletion(platform, "dev", ok, keepalive=keep)
    bad = EventCompletion(platform, "dev", failing)
    seen: list = []
    done.add_done_callback(seen.append)
    bad.add_done_callback(seen.append)
    ok.gate.set()
    failing.gate.set()
    done.wait(timeout=5)
    with pytest.raises(RuntimeError, match="device fault"):
        bad.wait(timeout=5)
    deadline = threading.Event()
    for _ in range(100):  # the watcher thread runs the callbacks
        if len(seen) == 2:
            break
        deadline.wait(0.05)
    assert seen[0] is None and isinstance(seen[1], RuntimeError) and len(seen) == 2
    assert done._keepalive == []
    late: list = []
    done.add_done_callback(late.append)  # after it finished: at once, with the same outcome
    assert late == [None]


def test_the_watcher_sleeps_on_a_host_event_recorded_where_the_work_ends_and_streams_never_wait_on_it():
    """Streams wait on plain events (a wait on a blocking-sync event costs device time); the watcher sleeps on a
    host event recorded on the work's stream when the first callback is added."""

    class SpinOnly(Event):
        def synchronize(self) -> None:
            raise AssertionError("the watcher synchronized on the plain event")

    class HostEvent(Event):
        def record(self, stream) -> None:
            self.recorded_on = stream

    host_events: list = []

    class HostPlatform(Platform):
        def new_host_event(self):
            host_events.append(HostEvent())
            return host_events[-1]

    platform, plain, work_stream = HostPlatform(), SpinOnly(), Stream()
    completion = EventCompletion(platform, "dev", plain, stream=work_stream)
    assert host_events == []  # nobody waits on the host yet: no host event, no device cost
    seen = threading.Event()
    completion.add_done_callback(lambda error: seen.set() if error is None else None)
    completion.add_done_callback(lambda error: None)
    assert len(host_events) == 1 and host_events[0].recorded_on is work_stream
    completion.wait_on()
    completion.wait_on_all()
    assert platform.stream.waited == [plain, plain]
    assert not seen.wait(0.05)  # the work has not ended
    host_events[0].gate.set()
    assert seen.wait(5)


def test_ready_carries_its_error():
    failed = Ready(ValueError("bad"))
    assert failed.done()
    with pytest.raises(ValueError, match="bad"):
        failed.wait()
    seen: list = []
    failed.add_done_callback(seen.append)
    assert isinstance(seen[0], ValueError)
