"""TensorRT-LLM's scheduler hooks mapped onto the planning kvport's vLLM adapter uses (vllm_plan.SchedulerPlan, as it
is). Owns only the translation of TensorRT-LLM's request data; must not import TensorRT-LLM or touch KV memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from kvport.engines.vllm_plan import SchedulerPlan, StepRequest, TransferSpec


@dataclasses.dataclass
class TrtllmMetadata:
    """Scheduler -> worker, once per step (TensorRT-LLM broadcasts it from rank 0 to every worker)."""

    loads: list[TransferSpec] = dataclasses.field(default_factory=list)
    stores: list[TransferSpec] = dataclasses.field(default_factory=list)


class TrtllmPlan:
    """The per-request state TensorRT-LLM's hooks need beyond SchedulerPlan: the connector's own match (its
    update_state_after_alloc does not repeat it), each request's block ids (RequestData carries only the new ones)
    and the tokens its computed_position leaves out (TensorRT-LLM subtracts the connector's matched tokens)."""

    def __init__(self, lookup: Callable[[Sequence[int]], int], chunk_tokens: int, tokens_per_block: int) -> None:
        self.plan = SchedulerPlan(lookup, chunk_tokens, tokens_per_block)
        self._matched: dict[Any, int] = {}
        self._external: dict[Any, int] = {}
        self._blocks: dict[Any, list[int]] = {}

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        prompt = list(request.get_tokens(0))
        if not prompt:
            return 0, False
        matched = self.plan.match(request.request_id, prompt, num_computed_tokens)
        self._matched[request.request_id] = matched
        return matched, False  # loads run in start_load_kv, before the forward, on the forward's stream

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int]) -> None:
        matched = self._matched.pop(request.request_id, 0)
        prompt = list(request.get_tokens(0))
        if prompt:
            self.plan.after_alloc(request.request_id, prompt, matched)
            if matched:
                self._external[request.request_id] = matched

    def build_connector_meta(self, scheduler_output: Any) -> TrtllmMetadata:
        steps, prompts = [], {}
        for data in scheduler_output.new_requests:
            prompts[data.request_id] = list(data.new_tokens)
            steps.append(self._step(data))
        for data in scheduler_output.cached_requests:
            steps.append(self._step(data))
        loads, stores = self.plan.build(steps, prompts)
        return TrtllmMetadata(loads, stores)

    def request_finished(self, request: Any, cache_block_ids: Sequence[int]) -> bool:
        """Stores ran after the forwards that computed each chunk: nothing is left to save, free the blocks now."""
        self.plan.finished(request.request_id)
        for table in (self._matched, self._external, self._blocks):
            table.pop(request.request_id, None)
        return False

    def _step(self, data: Any) -> StepRequest:
        blocks = self._blocks.setdefault(data.request_id, [])
        blocks.extend(int(b) for b in data.new_block_ids)
        before = int(data.computed_position) + self._external.pop(data.request_id, 0)
        return StepRequest(data.request_id, before, int(data.num_scheduled_tokens), [list(blocks)])
