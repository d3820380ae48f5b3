"""Scheduler-side planning for the vLLM connector: which prefix to load and which new full chunks to store, per step.
Owns the per-request bookkeeping and the transfer specs it emits; must not import vLLM or touch KV memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


def metrics_port_for(base: int | None, worker: bool, rank: int) -> int | None:
    """The Prometheus port of one connector process. vLLM runs a scheduler connector and one worker connector per
    tensor-parallel rank, often in separate processes, and only one process can bind a port: the scheduler serves
    on ``metrics_port`` and TP rank r's worker on ``metrics_port + 1 + r``. (In one process both ports serve the
    same registry.)"""
    if base is None:
        return None
    return base + 1 + rank if worker else base


@dataclasses.dataclass
class TransferSpec:
    """One load or store the worker runs this step: chunks of ``tokens[:num_tokens]`` (a multiple of the chunk size),
    from ``skip_tokens`` on. A load never writes the blocks of tokens before ``skip_tokens`` (vLLM computed them
    itself and may share them); ``skip_tokens`` of a load is a multiple of vLLM's block size, maybe inside a chunk."""

    req_id: str
    tokens: list[int]
    # One block-id list per KV cache group, in the request's token order.
    block_ids: list[list[int]]
    num_tokens: int
    skip_tokens: int = 0
    # The request's own key root component (kvport.engines.vllm_identity.request_extra): LoRA, cache_salt, ...
    extra: bytes = b""


@dataclasses.dataclass
class _ReqState:
    prompt: list[int]
    extra: bytes = b""
    stored_upto: int = 0  # tokens [0, stored_upto) are known to be in the cache (loaded or stored)
    pending_load: int = 0  # tokens to load before this request's first forward (set after allocation)
    last_computed: int = 0


@dataclasses.dataclass
class StepRequest:
    """What the scheduler output says about one scheduled request in this step."""

    req_id: str
    num_computed_before: int
    num_scheduled: int
    block_ids: Sequence[Sequence[int]]


class SchedulerPlan:
    """Cached chunks past vLLM's own prefix hit per request (via ``lookup``) and the load/store specs for each step.

    ``lookup(tokens, start, extra)`` returns where the cached run of ``tokens`` that begins at the chunk holding token
    ``start`` ends (a multiple of the chunk size). A load starts where vLLM's own hit ends, also inside a chunk (the
    worker then writes only that chunk's remaining blocks), and leaves the prompt's last token to vLLM: vLLM needs
    at least one token to compute, so a prompt of exactly N cached chunks loads N chunks and reports all but its last
    token (vLLM recomputes that token into the block the load filled), as LMCache's connector does.
    """

    def __init__(self, lookup: Callable[[Sequence[int], int, bytes], int], chunk_tokens: int, block_size: int) -> None:
        if chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be a multiple of vLLM's block_size={block_size}")
        self._lookup = lookup
        self.chunk = chunk_tokens
        self.block_size = block_size
        self._reqs: dict[str, _ReqState] = {}
        self.requests = 0  # requests seen
        self.hit_requests = 0  # requests that loaded a prefix
        self.hit_tokens = 0  # tokens planned to load
        self.prompt_tokens = 0  # prompt tokens of the requests seen

    # ---- vLLM hooks, in the order vLLM calls them ----------------------------------------------------------
    def match(
        self,
        req_id: str,
        prompt: Sequence[int],
        num_computed: int,
        num_tokens: int | None = None,
        extra: bytes = b"",
    ) -> int:
        """Tokens beyond ``num_computed`` (vLLM's own hit, a multiple of its block size) that can be loaded, leaving
        at least the last of the request's ``num_tokens`` tokens (default: the prompt's) to compute. Side-effect
        free: vLLM may call it several times for one request."""
        num_tokens = len(prompt) if num_tokens is None else num_tokens
        limit = min(len(prompt), num_tokens - 1)
        if limit - num_computed <= 0 or len(prompt) < self.chunk or num_computed % self.block_size:
            return 0
        end = min(self._lookup(prompt, num_computed, extra), limit)
        return max(0, end - num_computed)

    def after_alloc(self, req_id: str, prompt: Sequence[int], num_external: int, extra: bytes = b"") -> None:
        state = self._reqs.get(req_id) or self._track(req_id, prompt, extra)
        state.pending_load = num_external

    def build(self, steps: Sequence[StepRequest], prompts: dict[str, Sequence[int]]) -> tuple[list, list]:
        """Load specs for requests scheduled for the first time after a hit, store specs for every request
        whose computed prompt tokens crossed a chunk boundary this step."""
        loads: list[TransferSpec] = []
        stores: list[TransferSpec] = []
        for step in steps:
            state = self._reqs.get(step.req_id)
            if state is None:
                prompt = prompts.get(step.req_id)
                if prompt is None:
                    continue
                state = self._track(step.req_id, prompt)
            blocks = [list(ids) for ids in step.block_ids]
            if state.pending_load:
                # A new request: vLLM counts its own hit plus ours as computed; whole chunks up to the end.
                local = step.num_computed_before - state.pending_load
                end = -(-step.num_computed_before // self.chunk) * self.chunk
                loads.append(TransferSpec(step.req_id, state.prompt, blocks, end, local, state.extra))
                self.hit_requests += 1
                self.hit_tokens += state.pending_load
                state.pending_load = 0
                if local < self.chunk:
                    # Chunks [0, end) are all known to be cached. After a longer vLLM hit the chunks of that hit
                    # are not known to be: the store path checks them (a present chunk costs a lookup, no copy).
                    state.stored_upto = max(state.stored_upto, end)
            before = step.num_computed_before
            if before < state.last_computed:
                # vLLM rolled the request back (preemption, or a failed load it now recomputes): chunks past
                # the rollback point must be stored again once recomputed (present ones are skipped cheaply).
                state.stored_upto = min(state.stored_upto, before // self.chunk * self.chunk)
            after = before + step.num_scheduled
            state.last_computed = after
            store_to = min(after, len(state.prompt)) // self.chunk * self.chunk
            if store_to > state.stored_upto:
                stores.append(TransferSpec(step.req_id, state.prompt, blocks, store_to, state.stored_upto, state.extra))
                state.stored_upto = store_to
        return loads, stores

    def finished(self, req_id: str) -> None:
        self._reqs.pop(req_id, None)

    def _track(self, req_id: str, prompt: Sequence[int], extra: bytes = b"") -> _ReqState:
        state = self._reqs[req_id] = _ReqState(list(prompt), extra)
        self.requests += 1
        self.prompt_tokens += len(state.prompt)
        return state

    def tracked(self) -> int:
        return len(self._reqs)
