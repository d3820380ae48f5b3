"""Runs a planned transfer of one or more chunks between paged engine memory and host memory on side streams.
Owns stream/event ordering and staging buffers; must not choose the path (planner.py) or hold kernels.

Ordering: a transfer first waits on the stream that was current when it was issued (the engine's compute stream),
so a gather after the forward pass never reads KV that is still being written. Its result carries a Completion
(kvport.hal.completion): the engine orders its stream after it before it reads blocks a load scattered
(``TransferResult.wait``), and the cache commits a gathered chunk, or frees a host buffer a scatter read, only in
the completion's callback. A transfer of several chunks (one request's prefix, each chunk in its own host buffer)
is one pipeline and one completion."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.completion import Completion, EventCompletion
from kvport.hal.transfer.pieces import stream_pieces
from kvport.hal.transfer.planner import CostModel, Plan, plan
from kvport.hal.transfer.regions import region_template
from kvport.hal.transfer.segments import check_buffer

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


# Most chunks one stacked launch moves (bounds the segment table a stack compiles; 64 x 9 MiB MLA chunks already
# exceed the 256 MiB piece).
MAX_STACK = 64


@dataclasses.dataclass(frozen=True)
class _Work:
    """What one kernel launch moves through one staging piece: a piece of a chunk (large chunks) or a stack of whole
    chunks (kvport.hal.transfer.stacking), its block ids, and where its bytes go on the host."""

    sub: CopyDescriptor
    block_ids: Sequence
    flat_ids: object  # device block-id table for the backend, or None
    hosts: tuple  # (host tensor, its offset in the staging piece) per destination
    nbytes: int

    def to_hosts(self, buf) -> None:
        for host, offset in self.hosts:
            host.copy_(buf[offset : offset + host.numel()], non_blocking=True)

    def from_hosts(self, buf) -> None:
        for host, offset in self.hosts:
            buf[offset : offset + host.numel()].copy_(host, non_blocking=True)


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
        self._staging: list[torch.Tensor] = []
        # Chunks that fit one staging piece go through the native backend in one call, with staging slots of their
        # own (kvport.hal.transfer.one_call).
        self._one_call = None
        if hasattr(backend, "staged_chunk"):
            from kvport.hal.transfer.one_call import OneCallChunks

            self._one_call = OneCallChunks(self.platform, self.device, self.kernel_stream, self.dma_stream)
        # Per-transfer host work memoized (host time matters): plans and staged pieces, see _memo.
        self._pieces: dict = {}
        self._plans: dict = {}
        self._templates: dict = {}
        self._stacks: dict = {}

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
        (``completion.wait_on``), so a path that releases sooner is preferred where this transfer has one."""
        release_first = engine_waits and chunks == 1 and self._one_call_fits(descriptor, num_tokens)
        return self._memo(
            self._plans,
            (num_tokens, direction, path, chunks, release_first),
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
                release_first,
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
            event, released = self._one_call.issue(self.backend, descriptor, chunks[0], num_tokens, direction, after)
            completion = EventCompletion(self.platform, self.device, event, keep, released)
            return TransferResult(chosen.path, chosen.reason, completion)
        self._order_after(after)
        released = None  # where the transfer is done with engine memory, if before its end
        if chosen.path == "dma":
            self._dma(direction, descriptor, chunks, num_tokens, keep)
            done = self.dma_stream
        elif chosen.path == "zero-copy":
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
        else:
            done = self._staged(direction, descriptor, chunks, num_tokens, keep)
            if direction == "d2h" and done is self.dma_stream:  # gathers into pieces, copied out after them
                released = self.platform.new_event()
                released.record(self.kernel_stream)
        event = self.platform.new_event()
        event.record(done)
        completion = EventCompletion(self.platform, self.device, event, keep, released)
        return TransferResult(chosen.path, chosen.reason, completion)

    def _fits_one_call(self, descriptor, chunks, num_tokens: int) -> bool:
        return len(chunks) == 1 and self._one_call_fits(descriptor, num_tokens)

    def _one_call_fits(self, descriptor, num_tokens: int) -> bool:
        """A chunk of ``num_tokens`` fits one staging piece, and the backend issues it in one call."""
        if self._one_call is None or num_tokens <= 0:
            return False
        return len(self._piece_list(descriptor, num_tokens)) == 1

    def _order_after(self, after) -> None:
        if after is None:
            after = self.platform.current_stream(self.device)
        if after.query():
            # Everything issued on it already ran: no cross-stream wait (each cost the copy engines ~1% of a
            # back-to-back 256-token DMA chunk against LMCache's path, which waits on nothing; H200, same run).
            return
        if hasattr(after, "wait_event"):  # a stream: one event marks where both side streams start
            stream, after = after, self.platform.new_event()
            after.record(stream)
        self.kernel_stream.wait_event(after)
        self.dma_stream.wait_event(after)

    # ---- paths -------------------------------------------------------------------------------------------
    def _dma(self, direction, descriptor, chunks, num_tokens, keep) -> None:
        """One batched copy-engine call per chunk (split further past ``dma_batch_regions``): the engines start on
        the first chunk while the host describes the next."""
        from kvport.hal.transfer.segments import flat_block_ids

        template = self._memo(
            self._templates, (num_tokens,), descriptor, lambda: region_template(descriptor, num_tokens)
        )
        keep.append(template)
        with self.platform.stream_scope(self.dma_stream):
            for block_ids, host in chunks:
                flat = flat_block_ids(descriptor, block_ids, num_tokens)
                self.native.memcpy_chunk(
                    template,
                    flat,
                    host.data_ptr(),
                    direction == "d2h",
                    max_batch=self.model.dma_batch_regions,
                    overlap=self.model.dma_overlap,
                )

    def _piece_list(self, descriptor, num_tokens):
        piece = self.model.piece_bytes_for(descriptor.canonical_bytes(num_tokens))
        return self._memo(
            self._pieces, (num_tokens, piece), descriptor, lambda: stream_pieces(descriptor, num_tokens, piece)
        )

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

    def _work(self, descriptor, chunks, num_tokens, keep) -> list[_Work]:
        """The launches of a transfer, in order, with one upload of every chunk's block table. Chunks smaller than a
        piece are stacked, up to a piece's worth per launch; larger ones are split into pieces of streams."""
        import torch

        from kvport.hal.transfer.segments import flat_block_ids
        from kvport.hal.transfer.stacking import stacked_block_ids

        flat, joined, sizes = [None] * len(chunks), None, []
        if getattr(self.backend, "accepts_flat_ids", False):
            pinned = len(chunks) == 1  # one table: built page-locked, no joining copy
            tables = [flat_block_ids(descriptor, block_ids, num_tokens, pin_memory=pinned) for block_ids, _ in chunks]
            # From pinned memory without a host sync, so the launches below stay queued behind it on the stream.
            with self.platform.stream_scope(self.kernel_stream):
                host_ids = tables[0] if pinned else torch.cat(tables).pin_memory()
                joined = host_ids.to(self.device, non_blocking=True)
            keep.append(joined)
            sizes = [t.numel() for t in tables]
            flat = [joined] if pinned else list(torch.split(joined, sizes))
        chunk_bytes = descriptor.canonical_bytes(num_tokens)
        # Stacks up to a full ``piece_bytes``, not CostModel.piece_bytes_for's smaller pieces: for 32 DeepSeek-V4
        # chunks (191 MiB) four stacks instead of one gained alone (0.91 -> 0.92-0.94 of memcpy) but lost under
        # load (0.69-0.72 -> 0.54-0.55: every launch waits for SMs the GEMM holds). H200, one run, 2026-11-29.
        per_launch = min(MAX_STACK, self.model.piece_bytes // max(chunk_bytes, 1))
        if len(chunks) > 1 and per_launch > 1:
            work, first, start = [], 0, 0  # start: where chunk ``first``'s ids begin in ``joined``
            while first < len(chunks):
                group = chunks[first : first + per_launch]
                k = len(group)
                ids = None
                if joined is not None:
                    end = start + sum(sizes[first : first + k])
                    ids, start = joined[start:end], end
                stacked = self._stacked(descriptor, k)
                hosts = tuple((host[:chunk_bytes], j * chunk_bytes) for j, (_, host) in enumerate(group))
                block_ids = stacked_block_ids(descriptor, [b for b, _ in group])
                work.append(_Work(stacked, block_ids, ids, hosts, k * chunk_bytes))
                first += k
            return work
        pieces = self._piece_list(descriptor, num_tokens)
        return [
            _Work(sub, block_ids, ids, ((host[offset : offset + nbytes], 0),), nbytes)
            for (block_ids, host), ids in zip(chunks, flat)
            for sub, offset, nbytes in pieces
        ]

    def _stacked(self, descriptor, copies: int):
        from kvport.hal.transfer.stacking import stack

        return self._memo(self._stacks, (copies,), descriptor, lambda: stack(descriptor, copies))

    def _kernel(self, direction, work: _Work, buf, num_tokens, keep: list) -> None:
        enqueue = getattr(self.backend, "enqueue", None)
        if enqueue is not None:  # no per-launch completion: the move records one event for all of its work
            blocks = enqueue(work.sub, work.block_ids, buf, num_tokens, direction == "d2h", flat_ids=work.flat_ids)
            if blocks is not None and blocks is not work.flat_ids:
                keep.append(blocks)
        elif direction == "d2h":
            self.backend.gather(work.sub, work.block_ids, buf, num_tokens)
        else:
            self.backend.scatter(buf, work.sub, work.block_ids, num_tokens)

    def _staged(self, direction, descriptor, chunks, num_tokens, keep):
        """``staging_buffers`` device buffers in a ring: kernels fill pieces ahead while the copy engine drains.
        Returns the stream whose last operation ends the transfer."""
        # The staging buffers outlive a call: a transfer issued before this one may still be copying out of them
        # (d2h, on the DMA stream) or scattering from them (h2d, on the kernel stream) when this one starts.
        self.kernel_stream.wait_stream(self.dma_stream)
        work = self._work(descriptor, chunks, num_tokens, keep)
        size = max(w.nbytes for w in work)
        if len(work) == 1:
            # One piece: kernel and copy on one stream, so a small transfer (a 256-token chunk: 0.6 ms of link
            # time) pays no cross-stream event waits between its kernel and its copy.
            buf = self._stage(0, size)[: work[0].nbytes]
            with self.platform.stream_scope(self.kernel_stream):
                if direction == "h2d":
                    work[0].from_hosts(buf)
                self._kernel(direction, work[0], buf, num_tokens, keep)
                if direction == "d2h":
                    work[0].to_hosts(buf)
            return self.kernel_stream
        self.dma_stream.wait_stream(self.kernel_stream)
        ring = min(len(work), self.model.staging_buffers)
        bufs = [self._stage(i, size) for i in range(ring)]
        freed: list = [None] * ring  # event: ring slot i is free again
        # d2h: kernel fills a slot, the copy engine drains it; h2d: the copy engine fills, the kernel drains.
        fill, drain = (
            (self.kernel_stream, self.dma_stream) if direction == "d2h" else (self.dma_stream, self.kernel_stream)
        )
        for k, item in enumerate(work):
            slot = k % ring
            buf = bufs[slot][: item.nbytes]
            if freed[slot] is not None:
                fill.wait_event(freed[slot])
            with self.platform.stream_scope(fill):
                if direction == "d2h":
                    self._kernel(direction, item, buf, num_tokens, keep)
                else:
                    item.from_hosts(buf)
            filled = self.platform.new_event()
            filled.record(fill)
            drain.wait_event(filled)
            with self.platform.stream_scope(drain):
                if direction == "d2h":
                    item.to_hosts(buf)
                else:
                    self._kernel(direction, item, buf, num_tokens, keep)
            freed[slot] = self.platform.new_event()
            freed[slot].record(drain)
        # The fill stream's last operation precedes the last drain through the events above.
        return drain
