"""The torch reference backend: runs anywhere torch runs (CPU, Gaudi, any GPU) and is the correctness oracle.
Owns only the adapter from the Backend interface to kvport.kernels.torch; must not be tuned for speed."""

from __future__ import annotations

from kvport.hal.backend import Backend, Verdict
from kvport.kernels.torch.gather import gather as _gather
from kvport.kernels.torch.scatter import scatter as _scatter


class TorchBackend(Backend):
    name = "torch"
    priority = 0

    def available(self, platform) -> Verdict:
        return Verdict.yes(f"pure torch, runs on {platform.name}")

    def gather(self, descriptor, block_ids, dst, num_tokens) -> None:
        _gather(descriptor, block_ids, dst, num_tokens)

    def scatter(self, src, descriptor, block_ids, num_tokens) -> None:
        _scatter(src, descriptor, block_ids, num_tokens)
