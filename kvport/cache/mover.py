"""The mover: moves canonical chunks between one engine's KV memory and host buffers, and says when each move is done.
Owns the descriptor, the copy backend, the platform and the transfer pipeline of one bound engine; must not decide
what is cached or where (the chunk store does), and must not let anyone read a buffer before its completion."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvport.hal.completion import Completion, all_of

if TYPE_CHECKING:
    import torch

    from kvport.hal.backend import Backend
    from kvport.hal.platforms.base import Platform
    from kvport.hal.transfer.planner import CostModel
    from kvport.layouts.descriptor import CopyDescriptor


class ChunkMover:
    """``to_host`` gathers chunks out of engine blocks into host buffers, ``from_host`` scatters host buffers into
    engine blocks; both return a Completion. On platforms with streams every move runs through the transfer
    pipeline (kvport.hal.transfer: the planner picks DMA, staged or zero-copy; the same code `kvport bench kernels`
    measures), ordered after the work already issued on the engine's current stream. Elsewhere the backend copies
    synchronously and the completion is done at once. Thread-safe: one issuing thread at a time."""

    def __init__(
        self,
        descriptor: CopyDescriptor,
        backend: Backend,
        platform: Platform,
        path: str = "auto",
        model: CostModel | None = None,
    ) -> None:
        self.descriptor, self.backend, self.platform, self.path = descriptor, backend, platform, path
        self.device = descriptor.streams[0].buffer.device
        self._lock = threading.Lock()
        self.transfer = None
        if platform.async_copies and self.device.type != "cpu":
            from kvport.hal.transfer.executor import Transfer

            self.transfer = Transfer(backend, self.device, model=model, native=_copy_engine(backend, platform))

    def to_host(
        self, tables: Sequence, buffers: Sequence[torch.Tensor], num_tokens: int, engine_waits: bool = False
    ) -> Completion:
        """Gather ``num_tokens`` tokens per chunk: chunk i from block ids ``tables[i]`` into ``buffers[i]``.
        ``engine_waits``: the engine orders its next work after the completion's release (``wait_on``); the
        planner then prefers a path that releases sooner (kvport.hal.transfer.executor.Transfer.plan)."""
        return self._move("d2h", tables, buffers, num_tokens, engine_waits)

    def from_host(
        self, buffers: Sequence[torch.Tensor], tables: Sequence, num_tokens: int, engine_waits: bool = False
    ) -> Completion:
        """Scatter chunk i from ``buffers[i]`` into block ids ``tables[i]`` (``engine_waits``: as ``to_host``)."""
        return self._move("h2d", tables, buffers, num_tokens, engine_waits)

    def path_for(self, direction: str, num_tokens: int, chunks: int = 1, engine_waits: bool = False) -> str:
        """The transfer path a move of ``chunks`` chunks would take ("sync" where copies are synchronous)."""
        if self.transfer is None:
            return "sync"
        with self._lock:
            return self.transfer.plan(self.descriptor, num_tokens, direction, self.path, chunks, engine_waits).path

    def _move(
        self, direction: str, tables: Sequence, buffers: Sequence, num_tokens: int, engine_waits: bool
    ) -> Completion:
        if len(tables) != len(buffers):
            raise ValueError(f"mover: {len(tables)} block tables for {len(buffers)} buffers")
        if not buffers:
            return all_of([])
        with self._lock:
            if self.transfer is not None:
                chunks = list(zip(tables, buffers))
                return self.transfer.move(
                    direction, self.descriptor, chunks, num_tokens, self.path, engine_waits=engine_waits
                ).completion
            done = []
            for table, buffer in zip(tables, buffers):
                if direction == "d2h":
                    done.append(self.backend.gather(self.descriptor, table, buffer, num_tokens))
                else:
                    done.append(self.backend.scatter(buffer, self.descriptor, table, num_tokens))
            return all_of(done)


def build_mover(
    descriptor: CopyDescriptor,
    chunk_tokens: int,
    backend_name: str | None = None,
    backend: Backend | None = None,
    path: str = "auto",
) -> ChunkMover:
    """The mover for an engine's KV memory: checks the chunk size against every group's block size, picks the
    platform from the device and the backend from the registry (``backend_name`` / KVPORT_BACKEND) unless given,
    and refuses a pinned transfer ``path`` that cannot run here (one line each)."""
    from kvport.errors import UserError
    from kvport.hal.platform import detect_platform
    from kvport.hal.platforms import platform_for_device

    for group in descriptor.groups:
        if chunk_tokens % group.tokens_per_block:
            raise UserError(
                f"cache config: chunk_tokens={chunk_tokens} is not a multiple of layout {descriptor.layout} group "
                f"{group.name!r} tokens_per_block={group.tokens_per_block}"
            )
    info = detect_platform()
    platform = platform_for_device(descriptor.streams[0].buffer.device, info)
    if backend is None:
        from kvport.hal.registry import BackendError, select_backend

        environ = {"KVPORT_BACKEND": backend_name} if backend_name else None
        try:
            backend = select_backend(info, descriptor, environ=environ)
        except BackendError as exc:
            raise UserError(f"cache config: {exc}") from None
    mover = ChunkMover(descriptor, backend, platform, path=path)
    if path != "auto":
        if mover.transfer is None:
            raise UserError(f"cache config: transfer_path={path}: moves on {platform.name} are synchronous")
        why = mover.transfer.allowed(descriptor).get(path)
        if why:
            raise UserError(f"cache config: transfer_path={path} cannot run here: {why}")
    return mover


def _copy_engine(backend: Backend, platform: Platform):
    """The native backend whose memcpy_batch drives the copy engines (the DMA path), or None where there is none."""
    if hasattr(backend, "memcpy_regions"):
        return backend
    if platform.native_target is None:
        return None
    from kvport.hal.registry import load_backend

    try:
        native = load_backend(platform.native_target)
    except Exception:  # no native module in this install: the planner then never picks the DMA path
        return None
    from kvport.hal.platform import detect_platform

    return native if native.available(detect_platform()) else None
