"""Tests for kvport.store.l1: LRU order, pins under concurrent readers, exhaustion without allocation."""

from __future__ import annotations

import threading

import torch

from kvport.store.l1 import SLOT_ALIGN, L1Pool

CHUNK = 1000  # not a multiple of the slot alignment on purpose


def fill(pool: L1Pool, key: str, value: int) -> None:
    lease = pool.reserve(key)
    assert lease is not None
    lease.buffer.fill_(value)
    pool.commit(lease)
    lease.release()


def test_allocated_once_and_sliced():
    pool = L1Pool(4 * SLOT_ALIGN + 10, CHUNK)
    assert pool.num_slots == 4
    memory = pool.memory.data_ptr()
    for i in range(20):
        fill(pool, f"k{i}", i)
    assert pool.memory.data_ptr() == memory and pool.memory.numel() == 4 * SLOT_ALIGN
    with pool.acquire("k19") as lease:
        assert lease.buffer.numel() == CHUNK and lease.buffer.data_ptr() % SLOT_ALIGN == 0


def test_lru_evicts_least_recently_used():
    pool = L1Pool(3 * SLOT_ALIGN, CHUNK)
    for i in range(3):
        fill(pool, f"k{i}", i)
    pool.acquire("k0").release()  # k0 becomes most recent; k1 is now the LRU
    fill(pool, "k3", 3)
    assert not pool.contains("k1")
    assert pool.contains("k0") and pool.contains("k2") and pool.contains("k3")
    assert pool.evictions == 1


def test_pinned_entries_never_evicted_and_exhaustion_returns_none():
    pool = L1Pool(2 * SLOT_ALIGN, CHUNK)
    fill(pool, "a", 1)
    fill(pool, "b", 2)
    held = [pool.acquire("a"), pool.acquire("b")]
    assert pool.reserve("c") is None  # every slot pinned: skip, never allocate
    assert pool.exhausted == 1
    assert torch.all(held[0].buffer == 1) and torch.all(held[1].buffer == 2)
    held[0].release()
    lease = pool.reserve("c")
    assert lease is not None and not pool.contains("a") and pool.contains("b")
    lease.release()


def test_reserved_slot_invisible_until_commit_and_abort_frees_it():
    pool = L1Pool(SLOT_ALIGN, CHUNK)
    lease = pool.reserve("x")
    assert not pool.contains("x") and pool.acquire("x") is None
    assert pool.reserve("x") is None  # a second writer of the same key backs off
    pool.abort(lease)
    assert pool.reserve("y") is not None  # the one slot is free again


def test_concurrent_readers_never_see_their_slot_reused():
    pool = L1Pool(8 * SLOT_ALIGN, CHUNK)
    for i in range(8):
        fill(pool, f"k{i}", i)
    errors: list[str] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        i = seed
        while not stop.is_set():
            key = f"k{i % 64}"
            lease = pool.acquire(key)
            if lease is not None:
                expected = int(key[1:]) % 256
                for _ in range(3):  # hold the pin across several checks while writers churn
                    if not torch.all(lease.buffer == expected):
                        errors.append(f"{key} overwritten under its reader")
                lease.release()
            i += 7

    def writer(seed: int) -> None:
        for n in range(3000):
            key = f"k{(seed * 1000 + n) % 64}"
            lease = pool.reserve(key)
            if lease is None:
                continue
            lease.buffer.fill_(int(key[1:]) % 256)
            pool.commit(lease)
            lease.release()

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert pool.evictions > 0  # the churn really evicted
    assert pool.pinned_count() == 0


def test_acquire_waits_for_a_fill_in_progress():
    pool = L1Pool(2 * SLOT_ALIGN, CHUNK)
    lease = pool.reserve("x")
    assert pool.acquire("x") is None  # no wait asked: a slot being filled is not there yet
    timer = threading.Timer(0.05, lambda: (lease.buffer.fill_(7), pool.commit(lease), lease.release()))
    timer.start()
    got = pool.acquire("x", wait_fill=10)
    assert got is not None and torch.all(got.buffer == 7)
    got.release()
    aborted = pool.reserve("y")
    threading.Timer(0.05, pool.abort, args=(aborted,)).start()
    assert pool.acquire("y", wait_fill=10) is None  # the fill failed: absent, without waiting out the timeout
    assert pool.acquire("z", wait_fill=10) is None  # never reserved: returns at once
    assert pool.pinned_count() == 0


def test_reserve_never_evicts_protected_chunks_and_counts_their_pins():
    pool = L1Pool(3 * SLOT_ALIGN, CHUNK)
    for key in ("a", "b", "c"):
        fill(pool, key, 1)
    assert pool.reserve("d", protect={"a", "b", "c"}) is None  # only protected chunks left: no slot, none evicted
    assert all(pool.contains(k) for k in "abc") and pool.evictions == 0
    lease = pool.reserve("d", protect={"a", "b"})  # "c" is the only one it may take
    assert lease is not None and not pool.contains("c") and pool.contains("a") and pool.contains("b")
    reader = pool.acquire("a")
    assert pool.pinned_count() == 2 and pool.pinned_count(among={"a", "c"}) == 1 and pool.pinned_count(among=()) == 0
    reader.release()
    pool.abort(lease)
    assert pool.pinned_count() == 0
