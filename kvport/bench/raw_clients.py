"""The raw references of `kvport bench storage`: each server's own client doing the puts and gets kvport does (same
value sizes, batches and concurrency) with nothing of kvport in the way: no envelope, no checksum, no copy into L1.
Owns only those reference calls; must not be used by the cache."""

from __future__ import annotations

import concurrent.futures as cf
import os
import queue
from collections.abc import Sequence

from kvport.store.envelope import HEADER_BYTES


def _fanout(pool: cf.ThreadPoolExecutor, n: int, fn) -> list[cf.Future]:
    """One call on the pool, one future per key (as the Tier API hands them out)."""
    futures = [cf.Future() for _ in range(n)]

    def run() -> None:
        try:
            values = fn()
        except Exception as exc:  # noqa: BLE001 - reported through every future of the call
            for f in futures:
                f.set_exception(exc)
            return
        for f, v in zip(futures, values):
            f.set_result(v)

    pool.submit(run)
    return futures


class RawRedis:
    """Pipelined SET / GET / EXISTS of values as long as kvport's (header + chunk), on the tier's own client."""

    name = "redis-py pipelined SET/GET"

    def __init__(self, tier, chunk_bytes: int, concurrency: int) -> None:
        self.redis = tier.client
        self.value = os.urandom(HEADER_BYTES + chunk_bytes)
        self.pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="bench-raw-redis")

    def put(self, item) -> list[cf.Future]:
        keys, batch = item

        def run():
            pipe = self.redis.pipeline(transaction=False)
            for i in batch:
                pipe.set(keys[i], self.value)
            return pipe.execute()

        return _fanout(self.pool, len(batch), run)

    def get(self, item) -> list[cf.Future]:
        keys, batch = item

        def run():
            pipe = self.redis.pipeline(transaction=False)
            for i in batch:
                pipe.get(keys[i])
            values = pipe.execute()
            return [_Hit(v is not None and len(v) == len(self.value)) for v in values]

        return _fanout(self.pool, len(batch), run)

    def exists(self, keys: Sequence[str]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return pipe.execute()

    def delete(self, keys: Sequence[str]) -> None:
        self.redis.delete(*keys)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class RawMooncake:
    """Mooncake's plain batch_put_from / batch_get_into / batch_is_exist of whole values (header + chunk) between
    registered buffers, on the tier's own connected client."""

    name = "Mooncake batch_put_from/batch_get_into"

    def __init__(self, tier, chunk_bytes: int, n_dst: int, concurrency: int) -> None:
        import torch

        self.store = tier.client
        self.size = HEADER_BYTES + chunk_bytes
        self.batch = max(1, n_dst // concurrency)
        self.memory = torch.randint(0, 256, ((1 + n_dst) * self.size,), dtype=torch.uint8)
        if self.store.register_buffer(self.memory.data_ptr(), self.memory.numel()) != 0:
            raise RuntimeError("registering the raw reference's buffer failed")
        self.regions: queue.SimpleQueue[int] = queue.SimpleQueue()
        for region in range(concurrency):
            self.regions.put(region)
        self.pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix="bench-raw-mooncake")

    def put(self, item) -> list[cf.Future]:
        keys, batch = item
        src = self.memory.data_ptr()
        return _fanout(
            self.pool,
            len(batch),
            lambda: [
                _Hit(c == 0)
                for c in self.store.batch_put_from(
                    [keys[i] for i in batch], [src] * len(batch), [self.size] * len(batch)
                )
            ],
        )

    def get(self, item) -> list[cf.Future]:
        keys, batch = item

        def run():
            region = self.regions.get()
            try:
                base = self.memory.data_ptr() + (1 + region * self.batch) * self.size
                ptrs = [base + j * self.size for j in range(len(batch))]
                codes = self.store.batch_get_into([keys[i] for i in batch], ptrs, [self.size] * len(batch))
            finally:
                self.regions.put(region)
            return [_Hit(c == self.size) for c in codes]

        return _fanout(self.pool, len(batch), run)

    def exists(self, keys: Sequence[str]) -> list[int]:
        return self.store.batch_is_exist(list(keys))

    def delete(self, keys: Sequence[str]) -> None:
        self.store.batch_remove(list(keys), force=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.store.unregister_buffer(self.memory.data_ptr())


class _Hit:
    """A raw call's outcome in the shape of a ReadResult (``.value``), so both sides are counted alike."""

    __slots__ = ("value",)

    def __init__(self, ok: bool) -> None:
        self.value = "hit" if ok else "miss"
