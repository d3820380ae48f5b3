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
    # An asynchronous load (vLLM holds the request in WAITING_FOR_REMOTE_KVS until the worker reports it finished;
    # a failure is reported per request, never per block): see SchedulerPlan's ``load_async``.
    load_async: bool = False


@dataclasses.dataclass
class _ReqState:
    prompt: list[int]
    extra: bytes = b""
    stored_upto: int = 0  # tokens [0, stored_upto) are known to be in the cache (loaded or stored)
    pending_load: int = 0  # tokens to load before this request's first forward (set after allocation)
    last_computed: int = 0
    load_failed: bool = False  # an asynchronous load of this request failed: vLLM recomputes it, no second load


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

    With ``load_async`` (models with several KV cache groups: vLLM 0.32 cannot map per-block load failures back to
    requests there, ``Scheduler._handle_invalid_blocks`` raises), a hit is loaded asynchronously: the load spec is
    emitted in the step that allocated the blocks (the request is not scheduled then), vLLM waits for the worker to
    report it finished, and a failed load is reported per request (``load_failed``): vLLM frees its blocks and
    recomputes the whole request, and this plan loads nothing more for it.
    """

    def __init__(
        self,
        lookup: Callable[[Sequence[int], int, bytes], int],
        chunk_tokens: int,
        block_size: int,
        load_async: bool = False,
    ) -> None:
        if chunk_tokens % block_size:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be a multiple of vLLM's block_size={block_size}")
        self._lookup = lookup
        self.chunk = chunk_tokens
        self.block_size = block_size
        self.load_async = load_async
        self._reqs: dict[str, _ReqState] = {}
        self._matched_at: dict[str, int] = {}  # load_async: vLLM's own hit at the request's latest match
        self._async_loads: list[TransferSpec] = []  # load_async: specs to emit with this step's metadata
        self.requests = 0  # requests seen
        self.hit_requests = 0  # requests that loaded a prefix
        self.hit_tokens = 0  # tokens planned to load
        self.prompt_tokens = 0  # prompt tokens of the requests seen
        self.failed_loads = 0  # asynchronous loads the workers reported failed

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
        free apart from remembering ``num_computed`` for an asynchronous load: vLLM may call it several times for
        one request (the latest call is the one its allocation follows)."""
        num_tokens = len(prompt) if num_tokens is None else num_tokens
        limit = min(len(prompt), num_tokens - 1)
        if limit - num_computed <= 0 or len(prompt) < self.chunk or num_computed % self.block_size:
            return 0
        state = self._reqs.get(req_id)
        if state is not None and state.load_failed:
            return 0  # vLLM recomputes a request whose load failed: a second try could fail the same way
        end = min(self._lookup(prompt, num_computed, extra), limit)
        if self.load_async and end > num_computed:
            self._matched_at[req_id] = num_computed
        return max(0, end - num_computed)

    def after_alloc(
        self,
        req_id: str,
        prompt: Sequence[int],
        num_external: int,
        extra: bytes = b"",
        block_ids: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """vLLM allocated ``num_external`` tokens' blocks for our hit. Synchronous: the load is emitted when vLLM
        first schedules the request. Asynchronous (``block_ids``: all of the request's blocks, one list per group):
        the load is emitted with this step's metadata (the request waits in WAITING_FOR_REMOTE_KVS)."""
        state = self._reqs.get(req_id) or self._track(req_id, prompt, extra)
        local = self._matched_at.pop(req_id, None)
        if not (self.load_async and num_external):
            state.pending_load = num_external
            return
        if local is None or block_ids is None:
            raise RuntimeError(f"kvport: request {req_id}: asynchronous load of {num_external} tokens without a match")
        blocks = [list(ids) for ids in block_ids]
        self._async_loads.append(self._start_load(state, req_id, blocks, local + num_external, num_external, True))
        state.pending_load = 0

    def load_failed(self, req_ids: Sequence[str]) -> None:
        """The workers reported these requests' asynchronous loads failed (vLLM's ``failed_recving``): vLLM now
        recomputes each from its first token, so none of its chunks is known to be cached any more."""
        for req_id in req_ids:
            state = self._reqs.get(req_id)
            if state is not None:
                state.load_failed = True
                state.stored_upto = 0
                self.failed_loads += 1

    def build(self, steps: Sequence[StepRequest], prompts: dict[str, Sequence[int]]) -> tuple[list, list]:
        """Load specs for requests scheduled for the first time after a hit, store specs for every request
        whose computed prompt tokens crossed a chunk boundary this step."""
        loads, self._async_loads = self._async_loads, []
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
                # A new request: vLLM counts its own hit plus ours as computed.
                loads.append(
                    self._start_load(state, step.req_id, blocks, step.num_computed_before, state.pending_load, False)
                )
                state.pending_load = 0
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

    def _start_load(
        self, state: _ReqState, req_id: str, blocks: list[list[int]], computed: int, external: int, load_async: bool
    ) -> TransferSpec:
        """The load of tokens [computed - external, computed): whole chunks up to the end."""
        local = computed - external
        end = -(-computed // self.chunk) * self.chunk
        self.hit_requests += 1
        self.hit_tokens += external
        if local < self.chunk:
            # Chunks [0, end) are all known to be cached. After a longer vLLM hit the chunks of that hit are not
            # known to be: the store path checks them (a present chunk costs a lookup, no copy).
            state.stored_upto = max(state.stored_upto, end)
        return TransferSpec(req_id, state.prompt, blocks, end, local, state.extra, load_async)

    def finished(self, req_id: str) -> None:
        self._reqs.pop(req_id, None)
        self._matched_at.pop(req_id, None)

    def _track(self, req_id: str, prompt: Sequence[int], extra: bytes = b"") -> _ReqState:
        state = self._reqs[req_id] = _ReqState(list(prompt), extra)
        self.requests += 1
        self.prompt_tokens += len(state.prompt)
        return state

    def tracked(self) -> int:
        return len(self._reqs)
