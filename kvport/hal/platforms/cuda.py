"""NVIDIA (CUDA) and AMD (ROCm) platforms: torch.cuda streams and events, pinned host memory, mapped-host kernels.
Owns the torch.cuda calls of the data path; must not create a device context at import."""

from __future__ import annotations

from kvport.hal.platforms.base import StreamPlatform


class CudaPlatform(StreamPlatform):
    name = "cuda"
    kernels_address_host = True  # UVA: a pinned host pointer is valid in device code
    native_target = "cuda"
    # blocking=True: a host thread waiting on an event sleeps instead of spinning a core (the completion watcher
    # waits on every transfer).
    event_kwargs = {"blocking": True}

    def _api(self):
        import torch

        return torch.cuda


class RocmPlatform(CudaPlatform):
    """ROCm torch exposes HIP through the torch.cuda API; the native target is the HIP build of the same kernels."""

    name = "rocm"
    native_target = "hip"
