"""Worker-side execution of the connector's transfer specs: loads before the forward, stores after it.
Owns load-failure accounting and the test-only random-KV switch; must not import vLLM or plan what to transfer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvport.engines.vllm_plan import TransferSpec

if TYPE_CHECKING:
    from kvport.cache.engine import CacheEngine

log = logging.getLogger("kvport.vllm")


class WorkerSide:
    """Runs loads and stores on a bound CacheEngine and keeps the counters the connector reports."""

    def __init__(self, engine: CacheEngine, block_size: int, debug_random_load: bool = False) -> None:
        self.engine = engine
        self.block_size = block_size
        self.debug_random_load = debug_random_load
        self._invalid_blocks: set[int] = set()
        self.counters = {
            "load_requests": 0,
            "tokens_load_planned": 0,
            "tokens_loaded": 0,
            "load_failures": 0,
            "tokens_load_failed": 0,
            "store_requests": 0,
            "tokens_stored": 0,
            "random_loads": 0,
            "load_seconds": 0.0,  # wall time inside load(), including disk reads and checksum checks
            "store_seconds": 0.0,  # wall time inside store() (gather into L1; disk writes continue behind it)
        }

    def load(self, specs: Sequence[TransferSpec]) -> None:
        """Scatter each spec's cached prefix into its blocks; blocks whose chunk is missing or corrupt are
        reported to vLLM (``take_invalid_blocks``), which then recomputes them."""
        for spec in specs:
            start = time.perf_counter()
            loaded = self.engine.load(spec.tokens, spec.block_ids, spec.num_tokens)
            self.counters["load_seconds"] += time.perf_counter() - start
            self.counters["load_requests"] += 1
            self.counters["tokens_load_planned"] += spec.num_tokens
            self.counters["tokens_loaded"] += loaded
            if loaded < spec.num_tokens:
                self.counters["load_failures"] += 1
                self.counters["tokens_load_failed"] += spec.num_tokens - loaded
                first, last = loaded // self.block_size, -(-spec.num_tokens // self.block_size)
                self._invalid_blocks.update(spec.block_ids[0][first:last])
                log.warning(
                    "kvport: request %s loaded %d of %d cached tokens (chunk missing or failed its checksum); "
                    "vLLM recomputes the rest",
                    spec.req_id,
                    loaded,
                    spec.num_tokens,
                )
            if self.debug_random_load and loaded:
                self._scatter_random(spec, loaded)

    def store(self, specs: Sequence[TransferSpec]) -> None:
        """Gather the new full chunks of each spec out of vLLM's blocks (the caller synchronized the compute
        stream, so the KV written by this step's forward is complete)."""
        for spec in specs:
            start = time.perf_counter()
            stored = self.engine.store(spec.tokens, spec.block_ids, spec.num_tokens, spec.skip_tokens)
            self.counters["store_seconds"] += time.perf_counter() - start
            self.counters["store_requests"] += 1
            self.counters["tokens_stored"] += stored

    def take_invalid_blocks(self) -> set[int]:
        out, self._invalid_blocks = self._invalid_blocks, set()
        return out

    def stats(self) -> dict[str, Any]:
        return {"connector": dict(self.counters), "cache": self.engine.stats()}

    def _scatter_random(self, spec: TransferSpec, num_tokens: int) -> None:
        """TEST ONLY: overwrite the loaded tokens with random bytes through the same descriptor and backend, to
        prove that vLLM really reads what kvport loads (outputs must change)."""
        import torch

        descriptor, backend = self.engine.descriptor, self.engine.backend
        noise = torch.randint(0, 256, (descriptor.canonical_bytes(num_tokens),), dtype=torch.uint8)
        # Random bytes can be NaN/inf patterns in bf16; keep them finite so the change shows up as different
        # tokens rather than a crash: clear the exponent's top bit of every high byte (little-endian bf16/fp16).
        noise[1::2] &= 0xBF
        backend.scatter(noise, descriptor, spec.block_ids, num_tokens)
        self.counters["random_loads"] += 1
