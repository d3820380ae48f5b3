"""Runs a planned transfer between paged engine memory and pinned host memory on side streams, with events.
Owns stream/event ordering and staging buffers; must not choose the path (planner.py) or hold kernels.

Ordering: a transfer first waits on the stream that was current when it was issued (the engine's compute stream),
so a gather after the forward pass never reads KV that is still being written; the result's event is what the
engine must wait on before it reads blocks that a load scattered (``TransferResult.wait``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.transfer.planner import CostModel, Plan, plan
from kvport.hal.transfer.regions import regions
from kvport.hal.transfer.segments import check_buffer

if TYPE_CHECKING:
    import torch

    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor

# CTAs/programs a zero-copy kernel may hold: 8 of 132 H100 SMs kept 91% of the link in DESIGN.md's measurement
# while leaving most SMs to the engine.
ZERO_COPY_PROGRAMS = 8


@dataclasses.dataclass
class TransferResult:
    path: str
    reason: str
    event: torch.cuda.Event
    keepalive: list = dataclasses.field(default_factory=list, repr=False)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current one) wait for the transfer, without blocking the host."""
        import torch

        (stream or torch.cuda.current_stream()).wait_event(self.event)

    def synchronize(self) -> None:
        self.event.synchronize()
        self.keepalive.clear()


class Transfer:
    """Moves KV for one device with one backend. Not thread-safe: one per engine worker thread."""

    def __init__(self, backend: Backend, device, model: CostModel | None = None, native=None) -> None:
        import torch

        self.backend = backend
        self.device = torch.device(device)
        self.model = model or CostModel()
        self.native = native  # a NativeBackend for the DMA path, or None
        # High priority: under load the short gather/scatter kernels get SMs as soon as any free up, so the copy
        # engine is not left waiting behind a long engine kernel (the GEMM-under-load case of the benchmark).
        self.kernel_stream = torch.cuda.Stream(self.device, priority=-1)
        self.dma_stream = torch.cuda.Stream(self.device)
        self.zero_copy_programs = ZERO_COPY_PROGRAMS
        self._staging: list[torch.Tensor] = []
        # Per-transfer host work memoized (host time matters): plans and staged pieces, see _memo.
        self._pieces: dict = {}
        self._plans: dict = {}

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

    def plan(self, descriptor: CopyDescriptor, num_tokens: int, direction: str, path: str = "auto") -> Plan:
        return self._memo(
            self._plans,
            (num_tokens, direction, path),
            descriptor,
            lambda: plan(descriptor, num_tokens, direction, self.allowed(descriptor), path, self.model),
        )

    def to_host(
        self, descriptor, block_ids: Sequence, host: torch.Tensor, num_tokens: int, path: str = "auto", after=None
    ) -> TransferResult:
        return self._run("d2h", descriptor, block_ids, host, num_tokens, path, after)

    def from_host(
        self, host: torch.Tensor, descriptor, block_ids: Sequence, num_tokens: int, path: str = "auto", after=None
    ) -> TransferResult:
        return self._run("h2d", descriptor, block_ids, host, num_tokens, path, after)

    def _run(self, direction, descriptor, block_ids, host, num_tokens, path, after) -> TransferResult:
        import torch

        if host.device.type != "cpu" or not host.is_pinned():
            raise ValueError("transfer: the host chunk must be a pinned CPU tensor (torch.empty(..., pin_memory=True))")
        check_buffer("transfer host chunk", host, descriptor.canonical_bytes(num_tokens))
        chosen = self.plan(descriptor, num_tokens, direction, path)
        issuer = torch.cuda.current_stream(self.device)
        for stream in (self.kernel_stream, self.dma_stream):
            if after is None:
                stream.wait_stream(issuer)
            elif isinstance(after, torch.cuda.Event):
                stream.wait_event(after)
            else:
                stream.wait_stream(after)
        keep: list = [host]
        if chosen.path == "dma":
            self._dma(direction, descriptor, block_ids, host, num_tokens, keep)
            done = self.dma_stream
        elif chosen.path == "zero-copy":
            with torch.cuda.stream(self.kernel_stream):
                if direction == "d2h":
                    self.backend.gather(descriptor, block_ids, host, num_tokens, max_programs=self.zero_copy_programs)
                else:
                    self.backend.scatter(host, descriptor, block_ids, num_tokens, max_programs=self.zero_copy_programs)
            done = self.kernel_stream
        else:
            done = self._staged(direction, descriptor, block_ids, host, num_tokens)
        event = torch.cuda.Event()
        event.record(done)
        return TransferResult(chosen.path, chosen.reason, event, keep)

    def _dma(self, direction, descriptor, block_ids, host, num_tokens, keep) -> None:
        import torch

        eng, can, size = regions(descriptor, block_ids, num_tokens, host.data_ptr())
        dsts, srcs = (can, eng) if direction == "d2h" else (eng, can)
        keep.extend([dsts, srcs, size])
        with torch.cuda.stream(self.dma_stream):
            self.native.memcpy_regions(dsts, srcs, size)

    def _piece_list(self, descriptor, num_tokens):
        key = (num_tokens, self.model.piece_bytes)
        return self._memo(self._pieces, key, descriptor, lambda: self._split(descriptor, num_tokens))

    def _split(self, descriptor, num_tokens):
        """Consecutive streams grouped into pieces of at least ``piece_bytes`` (the last may be smaller):
        (sub-descriptor, chunk offset, bytes) each."""
        offsets = descriptor.stream_offsets(num_tokens)
        total = descriptor.canonical_bytes(num_tokens)
        pieces, start = [], 0
        for i in range(1, len(descriptor.streams) + 1):
            end = offsets[i] if i < len(offsets) else total
            if i == len(descriptor.streams) or end - offsets[start] >= self.model.piece_bytes:
                sub = dataclasses.replace(descriptor, streams=descriptor.streams[start:i])
                pieces.append((sub, offsets[start], end - offsets[start]))
                start = i
        return pieces

    def _stage(self, index: int, nbytes: int):
        import torch

        while len(self._staging) <= index:
            self._staging.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._staging[index].numel() < nbytes:
            # The old buffer may still be in use by queued side-stream work: let that finish before it is freed.
            self.kernel_stream.synchronize()
            self.dma_stream.synchronize()
            self._staging[index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._staging[index]

    def _staged_single(self, direction, descriptor, block_ids, host, num_tokens, size):
        """One piece: kernel and copy on one stream, so a small transfer (a 256-token chunk: 0.6 ms of link time)
        pays no cross-stream event waits between its kernel and its copy."""
        import torch

        buf = self._stage(0, size)[:size]
        with torch.cuda.stream(self.kernel_stream):
            if direction == "d2h":
                self.backend.gather(descriptor, block_ids, buf, num_tokens)
                host[:size].copy_(buf, non_blocking=True)
            else:
                buf.copy_(host[:size], non_blocking=True)
                self.backend.scatter(buf, descriptor, block_ids, num_tokens)
        return self.kernel_stream

    def _staged(self, direction, descriptor, block_ids, host, num_tokens):
        """``staging_buffers`` device buffers in a ring: kernels fill pieces ahead while the copy engine drains."""
        import torch

        from kvport.hal.transfer.tables import device_block_ids

        pieces = self._piece_list(descriptor, num_tokens)
        size = max(n for _, _, n in pieces)
        # The staging buffers outlive a call: a transfer issued before this one may still be copying out of them
        # (d2h, on the DMA stream) or scattering from them (h2d, on the kernel stream) when this one starts.
        self.kernel_stream.wait_stream(self.dma_stream)
        if len(pieces) == 1:
            return self._staged_single(direction, descriptor, block_ids, host, num_tokens, size)
        self.dma_stream.wait_stream(self.kernel_stream)
        ring = min(len(pieces), self.model.staging_buffers)
        bufs = [self._stage(i, size) for i in range(ring)]
        freed: list = [None] * ring  # event: ring slot i is free again
        extra = {}
        if getattr(self.backend, "accepts_flat_ids", False):
            with torch.cuda.stream(self.kernel_stream):
                extra["flat_ids"] = device_block_ids(descriptor, block_ids, num_tokens, self.device)
        for k, (sub, offset, nbytes) in enumerate(pieces):
            slot = k % ring
            buf = bufs[slot][:nbytes]
            if direction == "d2h":
                if freed[slot] is not None:
                    self.kernel_stream.wait_event(freed[slot])
                with torch.cuda.stream(self.kernel_stream):
                    self.backend.gather(sub, block_ids, buf, num_tokens, **extra)
                filled = torch.cuda.Event()
                filled.record(self.kernel_stream)
                self.dma_stream.wait_event(filled)
                with torch.cuda.stream(self.dma_stream):
                    host[offset : offset + nbytes].copy_(buf, non_blocking=True)
                freed[slot] = torch.cuda.Event()
                freed[slot].record(self.dma_stream)
            else:
                if freed[slot] is not None:
                    self.dma_stream.wait_event(freed[slot])
                with torch.cuda.stream(self.dma_stream):
                    buf.copy_(host[offset : offset + nbytes], non_blocking=True)
                filled = torch.cuda.Event()
                filled.record(self.dma_stream)
                self.kernel_stream.wait_event(filled)
                with torch.cuda.stream(self.kernel_stream):
                    self.backend.scatter(buf, sub, block_ids, num_tokens, **extra)
                freed[slot] = torch.cuda.Event()
                freed[slot].record(self.kernel_stream)
        if direction == "d2h":
            return self.dma_stream
        # The DMA stream's last copy precedes the last scatter through the events above.
        return self.kernel_stream
