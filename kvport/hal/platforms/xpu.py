"""Intel XPU (Data Center / Arc GPUs): torch.xpu streams and events, pinned host memory, Triton kernels.
Owns the torch.xpu calls of the data path; unverified on hardware (no XPU was available to the project)."""

from __future__ import annotations

from kvport.hal.platforms.base import StreamPlatform


class XpuPlatform(StreamPlatform):
    name = "xpu"
    # Whether Triton kernels on XPU may address host memory is not established: transfers go through device
    # staging buffers and the copy engine (staged path) only.
    kernels_address_host = False

    def _api(self):
        import torch

        return torch.xpu
