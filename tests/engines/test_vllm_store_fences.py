"""The asynchronous-store bookkeeping on its own: which requests the scheduler fences or keeps, and what the worker
orders and reports; both sides fed the same sequence must agree on every finished request."""

from __future__ import annotations

from kvport.engines.vllm_store_fences import PendingStores, StoreFences, group_blocks, stored_blocks
from kvport.hal.completion import Completion


class DeviceWork(Completion):
    """A store still running until ``finish()``; records the streams ordered after it."""

    def __init__(self) -> None:
        self.finished, self.waited_on = False, 0

    def finish(self) -> None:
        self.finished = True

    def done(self) -> bool:
        return self.finished

    def wait(self, timeout: float | None = None) -> None:
        raise AssertionError("the worker must never block the host on a store")

    def wait_on(self, stream=None) -> None:
        self.waited_on += 1

    def add_done_callback(self, fn) -> None:
        raise AssertionError("not used")


def test_stored_blocks_cover_the_stored_tokens_of_every_group() -> None:
    ids = [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert stored_blocks(ids, 16, 16, 48) == {(0, 11), (0, 12), (1, 21), (1, 22)}
    assert stored_blocks(ids, 16, 0, 40) == {(0, 10), (0, 11), (0, 12), (1, 20), (1, 21), (1, 22)}
    assert group_blocks(([1], [1, 2])) == {(0, 1), (1, 1), (1, 2)} and group_blocks(None) == set()


def test_scheduler_fences_preempted_and_reallocated_and_keeps_finished() -> None:
    fences = StoreFences()
    fences.stored("a", {(0, 1), (0, 2)})
    fences.stored("b", {(0, 3)})
    fences.stored("c", {(1, 3)})
    assert fences.fences({(0, 9)}, ()) == []  # nothing of theirs handed out
    assert fences.fences({(0, 2)}, {"c"}) == ["a", "c"]  # a's block reallocated, c preempted
    assert fences.fences({(0, 2)}, {"c"}) == []  # fenced once: their stores are ordered from then on
    assert fences.finished("a") is False  # fenced: nothing left in flight
    assert fences.finished("b") is True and fences.finished("b") is False
    assert (fences.fenced, fences.delayed_frees, fences.pending()) == (2, 1, 0)


def test_worker_fences_without_blocking_and_reports_finished_once_done() -> None:
    pending = PendingStores()
    a1, a2, b = DeviceWork(), DeviceWork(), DeviceWork()
    pending.add("a", a1)
    pending.add("a", a2)
    pending.add("b", b)
    a2.finish()
    assert pending.fence(["a"]) == 1 and (a1.waited_on, a2.waited_on) == (1, 0)  # only the running one
    assert pending.finished({"a", "b", "never-stored"}) == set()  # b still running; a fenced: not kept
    assert pending.running() == 1  # b; a1 (the stream is ordered after it) is no longer tracked
    b.finish()
    assert pending.finished(set()) == {"b"}  # named before, reported once its store is done
    assert pending.finished({"b"}) == set() and pending.reported == 1


def test_both_sides_agree_on_which_finished_requests_wait() -> None:
    """The scheduler's delay decisions and the worker's reports come from one metadata sequence: every request the
    scheduler keeps is reported exactly once, no other."""
    steps = [
        # (preempted, allocated, stores, finished after the step)
        ((), set(), [("a", {(0, 1)}), ("b", {(0, 2)})], []),
        (("b",), {(0, 7)}, [("c", {(0, 3)})], ["a"]),
        ((), {(0, 3)}, [("b", {(0, 4)})], ["b"]),
        ((), set(), [], ["c", "d"]),
    ]
    fences, pending = StoreFences(), PendingStores()
    kept, reported, works = set(), set(), []
    for preempted, allocated, stores, finished in steps:
        fenced = fences.fences(allocated, preempted)
        pending.fence(fenced)
        for req_id, blocks in stores:
            fences.stored(req_id, blocks)
            works.append(DeviceWork())
            pending.add(req_id, works[-1])
        kept |= {r for r in finished if fences.finished(r)}
        reported |= pending.finished(set(finished))  # nothing done yet
    assert kept == {"a", "b"} and reported == set()  # c was fenced (block 3 reallocated) before it finished
    for work in works:
        work.finish()
    assert pending.finished(set()) == kept
