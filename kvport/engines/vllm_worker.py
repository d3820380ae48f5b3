"""Worker-side execution of the connector's transfer specs: loads before the forward, stores after it.
Owns load-failure accounting and the test-only random-KV switch; must not import vLLM or plan what to transfer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvport.engines.vllm_plan import TransferSpec
from kvport.engines.vllm_store_fences import PendingStores

if TYPE_CHECKING:
    from kvport.cache.engine import CacheEngine

log = logging.getLogger("kvport.vllm")


class WorkerSide:
    """Runs loads and stores on a bound CacheEngine and keeps the counters the connector reports."""

    def __init__(
        self, engine: CacheEngine, block_size: int, debug_random_load: bool = False, async_stores: bool = True
    ) -> None:
        self.engine = engine
        self.block_size = block_size
        self.debug_random_load = debug_random_load
        # Stores the forward does not wait for (kvport.engines.vllm_store_fences); None: every store is ordered
        # before the next forward on the engine's stream.
        self.pending = PendingStores() if async_stores else None
        self._invalid_blocks: set[int] = set()
        self._finished_recving: set[str] = set()  # asynchronous loads issued since vLLM last asked
        self._failed_recving: set[str] = set()  # ... of which these loaded less than planned
        self.counters = {
            "load_requests": 0,
            "tokens_load_planned": 0,
            "tokens_loaded": 0,
            "load_failures": 0,
            "tokens_load_failed": 0,
            "store_requests": 0,
            "tokens_stored": 0,
            "random_loads": 0,
            "load_seconds": 0.0,  # host time issuing loads, including tier reads and checksum checks
            "store_seconds": 0.0,  # host time issuing stores (the gather and tier writes continue behind it)
            "fenced_running_stores": 0,  # stores still running when vLLM reused their blocks (the forward waited)
        }

    def load(self, specs: Sequence[TransferSpec]) -> None:
        """Scatter each spec's cached prefix into its blocks, ordered before the forward on the engine's current
        stream (no host wait). A synchronous load reports the blocks whose chunk is missing or corrupt
        (``take_invalid_blocks``), which vLLM then recomputes. An asynchronous load (``spec.load_async``, a model
        with several KV cache groups, where vLLM 0.32 refuses per-block reports) is reported finished with the
        step's transfer results and, when it loaded less than planned, failed (``take_transfer_results``): vLLM
        then recomputes the whole request. Either way the engine's stream is ordered after the scatter, so a later
        forward that reads the blocks never reads them unloaded."""
        for spec in specs:
            start = time.perf_counter()
            planned = spec.num_tokens - spec.skip_tokens
            try:
                ticket = self.engine.submit_load(
                    spec.tokens, spec.block_ids, spec.num_tokens, spec.skip_tokens, spec.extra, engine_waits=True
                )
                # The forward that reads these blocks is issued on this stream after us: it waits for the scatter.
                ticket.completion.wait_on()
                loaded = ticket.tokens
            except Exception:
                if not spec.load_async:
                    raise
                # An unanswered asynchronous load would hold the request in WAITING_FOR_REMOTE_KVS forever: report
                # it failed (vLLM recomputes it). Scatters issued before the error precede any later use of the
                # blocks on this stream.
                log.exception("kvport: request %s: asynchronous load failed", spec.req_id)
                loaded = 0
            self.counters["load_seconds"] += time.perf_counter() - start
            self.counters["load_requests"] += 1
            self.counters["tokens_load_planned"] += planned
            self.counters["tokens_loaded"] += loaded
            if spec.load_async:
                self._finished_recving.add(spec.req_id)
            if loaded < planned:
                self.counters["load_failures"] += 1
                self.counters["tokens_load_failed"] += planned - loaded
                if spec.load_async:
                    self._failed_recving.add(spec.req_id)
                else:
                    self._invalid_blocks.update(self._blocks_from(spec, spec.skip_tokens + loaded))
                log.warning(
                    "kvport: request %s loaded %d of %d cached tokens (chunk missing or failed its checksum); "
                    "vLLM recomputes %s",
                    spec.req_id,
                    loaded,
                    planned,
                    "the request" if spec.load_async else "the rest",
                )
            if self.debug_random_load and loaded:
                self._scatter_random(spec, loaded)

    def store(self, specs: Sequence[TransferSpec]) -> None:
        """Gather the new full chunks of each spec out of vLLM's blocks, ordered after this step's forward on the
        current stream (so it reads complete KV); the host does not wait. Asynchronous (the default): the next
        forwards run beside the store; the blocks stay untouched until ``fence`` or ``finished_stores`` says the
        store is done (kvport.engines.vllm_store_fences). Otherwise the stream is ordered after the gather (so a
        later forward cannot overwrite blocks it still reads)."""
        for spec in specs:
            start = time.perf_counter()
            if self.pending is not None:
                self.pending.add(spec.req_id, None)  # reported when it finishes, even if the store fails below
            ticket = self.engine.submit_store(
                spec.tokens,
                spec.block_ids,
                spec.num_tokens,
                spec.skip_tokens,
                spec.extra,
                engine_waits=self.pending is None,
            )
            if self.pending is None:
                ticket.completion.wait_on()
            else:
                self.pending.add(spec.req_id, ticket.completion)
            self.counters["store_seconds"] += time.perf_counter() - start
            self.counters["store_requests"] += 1
            self.counters["tokens_stored"] += ticket.tokens

    def fence(self, req_ids: Sequence[str]) -> None:
        """Before the forward: vLLM is about to reuse blocks these requests' stores may still read; order the
        engine's stream after those stores (no host wait)."""
        if self.pending is not None and req_ids:
            self.counters["fenced_running_stores"] += self.pending.fence(req_ids)

    def finished_stores(self, finished_req_ids: set[str]) -> set[str]:
        """Finished requests (named now or before) whose stores are all done: vLLM may free their blocks."""
        return self.pending.finished(finished_req_ids) if self.pending is not None else set()

    def _blocks_from(self, spec: TransferSpec, end: int) -> set[int]:
        """Every group's blocks that hold tokens [end, num_tokens): what vLLM must recompute."""
        out: set[int] = set()
        groups = self.engine.descriptor.groups
        for group, ids in zip(groups, spec.block_ids):
            per_block = group.tokens_per_block
            out.update(ids[end // per_block : -(-spec.num_tokens // per_block)])
        return out

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def take_transfer_results(self) -> tuple[set[str], set[str]]:
        """(finished, failed) asynchronous loads since the last call; every failed one is also finished (vLLM
        releases a request from WAITING_FOR_REMOTE_KVS only when it is reported finished)."""
        out = self._finished_recving, self._failed_recving
        self._finished_recving, self._failed_recving = set(), set()
        return out

    def stats(self) -> dict[str, Any]:
        counters = dict(self.counters)
        if self.pending is not None:
            counters |= {"stores_reported_done": self.pending.reported, "stores_running": self.pending.running()}
        return {"connector": counters, "cache": self.engine.stats()}

    def _scatter_random(self, spec: TransferSpec, num_tokens: int) -> None:
        """TEST ONLY: overwrite the loaded tokens with random bytes through the same descriptor and backend, to
        prove that vLLM really reads what kvport loads (outputs must change)."""
        import torch

        mover = self.engine.mover
        noise = mover.platform.host_empty(mover.descriptor.canonical_bytes(num_tokens))
        noise.copy_(torch.randint(0, 256, noise.shape, dtype=torch.uint8))
        # Random bytes can be NaN/inf patterns in bf16; keep them finite so the change shows up as different
        # tokens rather than a crash: clear the exponent's top bit of every high byte (little-endian bf16/fp16).
        noise[1::2] &= 0xBF
        # Only the blocks the load wrote (from skip_tokens, a multiple of every group's block size): the blocks
        # before it are vLLM's own and may be shared with other requests.
        groups = mover.descriptor.groups
        tables = [ids[spec.skip_tokens // g.tokens_per_block :] for g, ids in zip(groups, spec.block_ids)]
        mover.from_host([noise], [tables], num_tokens).wait()
        self.counters["random_loads"] += 1
