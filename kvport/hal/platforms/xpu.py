"""Intel XPU (Data Center / Arc GPUs): torch.xpu streams and events, pinned host memory, Triton kernels.
Owns the torch.xpu calls of the data path; unverified on hardware (no XPU was available to the project)."""

from __future__ import annotations

from kvport.hal.platforms.base import Platform


class XpuPlatform(Platform):
    name = "xpu"
    async_copies = True
    pinned_host = True
    # Whether Triton kernels on XPU may address host memory is not established: transfers go through device
    # staging buffers and the copy engine (staged path) only.
    kernels_address_host = False

    @staticmethod
    def _api():
        import torch

        return torch.xpu

    def current_stream(self, device):
        return self._api().current_stream(device)

    def new_stream(self, device, high_priority: bool = False):
        return self._api().Stream(device, priority=-1 if high_priority else 0)

    def stream_scope(self, stream):
        return self._api().stream(stream)

    def new_event(self):
        return self._api().Event()

    def synchronize(self, device) -> None:
        self._api().synchronize(device)
