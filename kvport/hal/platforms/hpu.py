"""Intel Gaudi (HPU): the torch reference backend moves KV; kvport treats copies as synchronous and syncs after them.
Owns the Gaudi sync call; unverified on hardware (no Gaudi was available to the project)."""

from __future__ import annotations

from kvport.hal.platforms.base import Platform


class HpuPlatform(Platform):
    name = "hpu"
    # kvport does not drive Gaudi streams: the mover synchronizes the device after each copy, so a copy is complete
    # when it returns. Slower than an overlapped path, but never a read of memory still being written.
    async_copies = False
    pinned_host = False

    def synchronize(self, device) -> None:
        import habana_frameworks.torch.core as htcore  # the Gaudi runtime; present wherever an hpu device exists

        htcore.mark_step()
        import torch

        torch.hpu.synchronize()
