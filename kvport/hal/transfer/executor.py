"""Runs a planned transfer of one or more chunks between paged engine memory and host memory on side streams.
Owns stream/event ordering and staging buffers; must not choose the path (planner.py) or hold kernels.

Ordering: a transfer first waits on the stream that was current when it was issued (the engine's compute stream),
so a gather after the forward pass never reads KV that is still being written; a staged load's copies into kvport's
own staging run before that wait, only its scatters follow it (kvport.hal.transfer.staged). Its result carries a
Completion (kvport.hal.completion): the engine orders its stream after it before it reads blocks a load scattered
(``TransferResult.wait``), and the cache commits a gathered chunk, or frees a host buffer a scatter read, only in
the completion's callback. A transfer of several chunks (one request's prefix, each chunk in its own host buffer)
is one pipeline and one completion."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.completion import Completion, EventCompletion
from kvport.hal.transfer.planner import CostModel, Plan, plan
from kvport.hal.transfer.regions import region_template
from kvport.hal.transfer.segments import check_buffer, flat_block_id_list
from kvport.hal.transfer.staged import StagedPipeline

if TYPE_CHECKING:
    import torch

    from kvport.hal.backend import Backend
    from kvport.hal.platforms.base import Platform
    from kvport.layouts.descriptor import CopyDescriptor

# CTAs/programs a zero-copy kernel may hold: 8 of 132 H100 SMs kept 91% of the link in DESIGN.md's measurement
# while leaving most SMs to the engine.
ZERO_COPY_PROGRAMS = 8


@dataclasses.dataclass
class TransferResult:
    path: str
    reason: str
    completion: Completion

    def wait(self, stream=None) -> None:
        """Make ``stream`` (default: the current one) wait for the whole transfer, host buffers included, without
        blocking the host. An engine that only needs its KV memory back waits less: ``completion.wait_on``."""
        self.completion.wait_on_all(stream)

    def synchronize(self) -> None:
        """Block the host until the transfer finished."""
        self.completion.wait()


class Transfer:
    """Moves KV for one device with one backend. Not thread-safe: one issuing thread at a time (the cache's mover
    holds a lock around it)."""

    def __init__(
        self, backend: Backend, device, model: CostModel | None = None, native=None, platform: Platform | None = None
    ) -> None:
        import torch

        from kvport.hal.platforms import platform_for_device

        self.backend = backend
        self.device = torch.device(device)
        api = getattr(torch, self.device.type, None)
        if self.device.index is None and self.device.type != "cpu" and hasattr(api, "current_device"):
            self.device = torch.device(self.device.type, api.current_device())  # native calls need the index
        self.platform = platform or platform_for_device(self.device)
        self.model = model or CostModel()
        self.native = native  # a NativeBackend for the DMA path, or None
        # Without batched calls (HIP builds) the planner keeps small regions off the copy engines.
        self.dma_batched = bool(getattr(native, "batched_copies", True))
        # High priority: under load the short gather/scatter kernels get SMs as soon as any free up, so the copy
        # engine is not left waiting behind a long engine kernel (the GEMM-under-load case of the benchmark).
        self.kernel_stream = self.platform.new_stream(self.device, high_priority=True)
        self.dma_stream = self.platform.new_stream(self.device)
        self.zero_copy_programs = ZERO_COPY_PROGRAMS
        # Chunks that fit one staging piece go through the native backend in one call, with staging slots of their
        # own (kvport.hal.transfer.one_call).
        self._one_call = None
        if hasattr(backend, "staged_chunk"):
            from kvport.hal.transfer.one_call import OneCallChunks

            self._one_call = OneCallChunks(self.platform, self.device, self.kernel_stream, self.dma_stream)
        # Per-transfer host work memoized (host time matters): plans, region templates, staged pieces; see _memo.
        self._plans: dict = {}
        self._templates: dict = {}
        self._dma_after = None  # (event, raw handle), see _dma_after_event
        self.staged = StagedPipeline(
            self.platform, self.device, backend, self.model, self.kernel_stream, self.dma_stream, self._memo
        )

    def allowed(self, descriptor: CopyDescriptor) -> dict[str, str]:
        """Per path, "" if it can run here or the reason it cannot."""
        out = {"dma": "", "staged": "", "zero-copy": ""}
        if self.native is None:
            out["dma"] = "needs the native module (memcpy_batch); not loaded"
        verdict = self.backend.supports(descriptor)
        if not verdict:
            out["staged"] = out["zero-copy"] = verdict.reason
        elif self.backend.name == "torch":
            out["zero-copy"] = "the torch backend cannot bound its SM use (no program limit)"
        elif not self.platform.kernels_address_host:
            out["zero-copy"] = f"kernels on {self.platform.name} do not address host memory"
        return out

    @staticmethod
    def _memo(cache: dict, key: tuple, descriptor: CopyDescriptor, make):
        """``make()`` memoized under (id(descriptor), *key). Entries hold the descriptor, so its id cannot be reused
        while cached; the cache is dropped past 256 entries so descriptors that come and go are not kept alive."""
        full = (id(descriptor), *key)
        hit = cache.get(full)
        if hit is not None and hit[0] is descriptor:
            return hit[1]
        value = make()
        if len(cache) > 256:
            cache.clear()
        cache[full] = (descriptor, value)
        return value

    def plan(
        self,
        descriptor: CopyDescriptor,
        num_tokens: int,
        direction: str,
        path: str = "auto",
        chunks: int = 1,
        engine_waits: bool = False,
    ) -> Plan:
        """The path for a move; ``engine_waits``: the caller orders its engine's next work after the move's release
        (``completion.wait_on``), so the staged path, which releases first, is preferred: a store gives engine
        memory back after its last gather (the copies to the host read staging), a load once its scatters ran (its
        copies into staging run before the engine's work ends, StagedPipeline.run), a one-call chunk likewise."""
        return self._memo(
            self._plans,
            (num_tokens, direction, path, chunks, engine_waits),
            descriptor,
            lambda: plan(
                descriptor,
                num_tokens,
                direction,
                self.allowed(descriptor),
                path,
                self.model,
                chunks,
                self.dma_batched,
                engine_waits,
            ),
        )

    # ---- entry points ----------------------------------------------------------------------------------------
    def to_host(
        self,
        descriptor,
        block_ids: Sequence,
        host: torch.Tensor,
        num_tokens: int,
        path: str = "auto",
        after=None,
        engine_waits: bool = False,
    ) -> TransferResult:
        return self.move("d2h", descriptor, [(block_ids, host)], num_tokens, path, after, engine_waits)

    def from_host(
        self,
        host: torch.Tensor,
        descriptor,
        block_ids: Sequence,
        num_tokens: int,
        path: str = "auto",
        after=None,
        engine_waits: bool = False,
    ) -> TransferResult:
        return self.move("h2d", descriptor, [(block_ids, host)], num_tokens, path, after, engine_waits)

    def move(
        self,
        direction: str,
        descriptor: CopyDescriptor,
        chunks: Sequence[tuple[Sequence, torch.Tensor]],
        num_tokens: int,
        path: str = "auto",
        after=None,
        engine_waits: bool = False,
    ) -> TransferResult:
        """Move ``chunks`` — (block ids, host buffer) pairs of ``num_tokens`` tokens each — in one pipeline:
        ``d2h`` gathers engine blocks into the host buffers, ``h2d`` scatters host buffers into engine blocks.
        ``engine_waits``: see ``plan``."""
        if not chunks:
            raise ValueError("transfer: no chunks to move")
        need = descriptor.canonical_bytes(num_tokens)
        for _, host in chunks:
            if not self.platform.is_host_ready(host):
                raise ValueError(
                    "transfer: a host chunk must be a pinned CPU tensor (torch.empty(..., pin_memory=True))"
                )
            check_buffer("transfer host chunk", host, need)
        chosen = self.plan(descriptor, num_tokens, direction, path, len(chunks), engine_waits)
        keep: list = [host for _, host in chunks]
        if chosen.path == "staged" and self._fits_one_call(descriptor, chunks, num_tokens):
            if after is not None:
                self._order_after(after)
            event, released, end = self._one_call.issue(
                self.backend, descriptor, chunks[0], num_tokens, direction, after
            )
            completion = EventCompletion(self.platform, self.device, event, keep, released, stream=end)
            return TransferResult(chosen.path, chosen.reason, completion)
        released = None  # where the transfer is done with engine memory, if before its end
        if chosen.path == "staged":
            done, released = self.staged.run(direction, descriptor, chunks, num_tokens, keep, self._engine_point(after))
        elif chosen.path == "dma":
            self._dma(direction, descriptor, chunks, num_tokens, keep, after)
            done = self.dma_stream
        else:
            self._order_after(after)
            with self.platform.stream_scope(self.kernel_stream):
                for block_ids, host in chunks:
                    if direction == "d2h":
                        self.backend.gather(
                            descriptor, block_ids, host, num_tokens, max_programs=self.zero_copy_programs
                        )
                    else:
                        self.backend.scatter(
                            host, descriptor, block_ids, num_tokens, max_programs=self.zero_copy_programs
                        )
            done = self.kernel_stream
        event = self.platform.new_event()
        event.record(done)
        completion = EventCompletion(self.platform, self.device, event, keep, released, stream=done)
        return TransferResult(chosen.path, chosen.reason, completion)

    def _fits_one_call(self, descriptor, chunks, num_tokens: int) -> bool:
        return len(chunks) == 1 and self._one_call_fits(descriptor, num_tokens)

    def _one_call_fits(self, descriptor, num_tokens: int) -> bool:
        """A chunk of ``num_tokens`` fits one staging piece, and the backend issues it in one call."""
        if self._one_call is None or num_tokens <= 0:
            return False
        return len(self.staged.piece_list(descriptor, num_tokens)) == 1

    def _engine_point(self, after):
        """The event a move must follow: ``after`` (an event or a stream; default the current stream) as an event,
        or None when everything issued on it already ran (no cross-stream wait: each cost the copy engines ~1% of
        a back-to-back 256-token DMA chunk against LMCache's path, which waits on nothing; H200, same run)."""
        if after is None:
            after = self.platform.current_stream(self.device)
        if after.query():
            return None
        if hasattr(after, "wait_event"):  # a stream: one event marks where the side streams start
            stream, after = after, self.platform.new_event()
            after.record(stream)
        return after

    def _order_after(self, after) -> None:
        point = self._engine_point(after)
        if point is not None:
            self.kernel_stream.wait_event(point)
            self.dma_stream.wait_event(point)

    # ---- paths -------------------------------------------------------------------------------------------
    def _dma(self, direction, descriptor, chunks, num_tokens, keep, after) -> None:
        """One batched copy-engine call per chunk (split further past ``dma_batch_regions``): the engines start on
        the first chunk while the host describes the next. The first call also orders the copies after the engine's
        current stream (``after`` None), in the same native call: per chunk, the Python-level stream scope, id
        tensor and engine-order steps cost the host ~35 of ~75 us of overhead on a 500-900 us call (H200 host,
        docs/performance.md, "2026-11-30, eleventh stop")."""
        template = self._memo(
            self._templates, (num_tokens,), descriptor, lambda: region_template(descriptor, num_tokens)
        )
        keep.append(template)
        if after is None:
            ordering = (self.platform.current_stream_handle(self.device.index), self._dma_after_event())
        else:
            self._order_after(after)
            ordering = (0, 0)
        stream = self.platform.stream_handle(self.dma_stream)
        for block_ids, host in chunks:
            self.native.memcpy_chunk(
                template,
                flat_block_id_list(descriptor, block_ids, num_tokens),
                host.data_ptr(),
                direction == "d2h",
                stream,
                ordering,
                max_batch=self.model.dma_batch_regions,
                overlap=self.model.dma_overlap,
            )
            ordering = (0, 0)

    def _dma_after_event(self) -> int:
        """The raw handle of the event the DMA path's engine-order wait goes through: reused (a stream wait keeps
        the record it saw), recorded once here because the platform creates events at their first record."""
        if self._dma_after is None:
            event = self.platform.new_event()
            event.record(self.dma_stream)
            self._dma_after = (event, self.platform.event_handle(event))
        return self._dma_after[1]
