"""The Platform contract: what a vendor offers the data path (pinned host memory, streams, events, sync).
Owns only the interface and the host-memory default; must not import a vendor runtime at module import."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class Platform:
    """Defaults describe a synchronous device without pinned memory (the CPU); vendors override what they have.

    Ordering contract: work issued on a stream runs in issue order; an event recorded on a stream completes when
    everything issued before it on that stream has; ``wait_event`` orders a stream after an event without
    blocking the host. Platforms without streams (``async_copies`` False) finish every copy before returning."""

    name = "cpu"
    # Copies and kernels are queued on streams and finish later: every transfer needs a completion.
    async_copies = False
    # Page-locked host memory exists: host buffers that copy engines (and zero-copy kernels) may address.
    pinned_host = False
    # Device kernels may read and write pinned host memory through its mapped address (zero-copy transfers).
    kernels_address_host = False
    # The native copy-engine path (kvport._native_<target>.memcpy_batch) serves this platform.
    native_target: str | None = None

    def host_empty(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory, pinned where the platform has pinned memory."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned_host)

    def register_host(self, tensor: torch.Tensor) -> bool:
        """Page-lock host memory allocated elsewhere (a mapped shared-memory file) so copy engines can address it;
        True when registered. Only CUDA and ROCm implement it; here it does nothing and says so with False (the
        server client then stages through pinned memory where ``pinned_host`` says the platform needs it: XPU)."""
        return False

    def unregister_host(self, tensor: torch.Tensor) -> None:
        return None

    def is_host_ready(self, tensor: torch.Tensor) -> bool:
        """Whether a host tensor can be the host side of an asynchronous copy on this platform."""
        return tensor.device.type == "cpu" and (not self.pinned_host or tensor.is_pinned())

    # ---- streams and events (platforms with async_copies override all of these) -------------------------------
    def current_stream(self, device) -> Any:
        return None

    def new_stream(self, device, high_priority: bool = False) -> Any:
        raise NotImplementedError(f"platform {self.name} has no streams")

    def stream_scope(self, stream) -> contextlib.AbstractContextManager:
        """Make ``stream`` current for the work issued inside the block."""
        return contextlib.nullcontext()

    def new_event(self) -> Any:
        raise NotImplementedError(f"platform {self.name} has no events")

    def new_host_event(self) -> Any:
        raise NotImplementedError(f"platform {self.name} has no events")

    def synchronize(self, device) -> None:
        """Block the host until all work queued on ``device`` finished (for synchronous fallbacks only)."""
        return None

    # ---- raw handles, for native calls that order streams themselves (platforms with a native target) ----------
    def current_stream_handle(self, index: int) -> int:
        raise NotImplementedError(f"platform {self.name} has no raw stream handles")

    def stream_handle(self, stream) -> int:
        raise NotImplementedError(f"platform {self.name} has no raw stream handles")

    def event_handle(self, event) -> int:
        raise NotImplementedError(f"platform {self.name} has no raw event handles")


class StreamPlatform(Platform):
    """A platform whose torch module (torch.cuda, torch.xpu) has streams and events: subclasses name the module."""

    async_copies = True
    pinned_host = True
    # Extra arguments of the module's Event for host waits (new_host_event).
    host_event_kwargs: dict = {}

    def _api(self):
        raise NotImplementedError

    def current_stream(self, device):
        return self._api().current_stream(device)

    def new_stream(self, device, high_priority: bool = False):
        # Priority -1 is the highest torch exposes: short gather/scatter kernels get SMs as soon as any free up, so the
        # copy engine is not left waiting behind a long engine kernel.
        return self._api().Stream(device, priority=-1 if high_priority else 0)

    def stream_scope(self, stream):
        return _StreamScope(self._api(), stream)

    def new_event(self):
        """A plain event (no timing, no blocking sync), for streams to wait on: a stream waiting on a CUDA event made
        with blocking sync lost ~3.5-4 us of device time per wait, 4% of a one-chunk 9 MiB DMA transfer with its two
        engine-order waits (H200, docs/performance.md, "2026-11-30, afternoon"). A host synchronizing on it spins."""
        return self._api().Event()

    def new_host_event(self):
        """An event a host thread sleeps on (``host_event_kwargs``); no stream waits on it."""
        return self._api().Event(**self.host_event_kwargs)

    def synchronize(self, device) -> None:
        self._api().synchronize(device)


class _StreamScope:
    """``stream`` current on its device for a block, the previous stream restored after. torch's own context
    (``torch.cuda.stream``) looks the current device up twice on entry, ~10 us of host time per scope in an H200
    profile with two scopes per chunk; this one asks once and uses torch's context only when the stream is on
    another device than the current one (that context also switches devices)."""

    __slots__ = ("_api", "_stream", "_previous", "_fallback")

    def __init__(self, api, stream) -> None:
        self._api, self._stream, self._previous, self._fallback = api, stream, None, None

    def __enter__(self):
        api, stream = self._api, self._stream
        index = getattr(stream, "device_index", None)
        if stream is None or index is None or index != api.current_device():
            self._fallback = api.stream(stream)
            return self._fallback.__enter__()
        self._previous = api.current_stream(index)
        api.set_stream(stream)
        return None

    def __exit__(self, *exc) -> None:
        if self._fallback is not None:
            self._fallback.__exit__(*exc)
        else:
            self._api.set_stream(self._previous)
