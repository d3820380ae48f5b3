"""The torch reference backend: runs anywhere torch runs (CPU, Gaudi, any GPU) and is the correctness oracle.
Owns only the adapter from the Backend interface to kvport.kernels.torch; must not be tuned for speed."""

from __future__ import annotations

from kvport.hal.backend import Backend, Verdict
from kvport.hal.completion import Completion, completion_after
from kvport.kernels.torch.gather import gather as _gather
from kvport.kernels.torch.scatter import scatter as _scatter


class TorchBackend(Backend):
    name = "torch"
    priority = 0

    def available(self, platform) -> Verdict:
        return Verdict.yes(f"pure torch, runs on {platform.name}")

    def gather(self, descriptor, block_ids, dst, num_tokens) -> Completion:
        _gather(descriptor, block_ids, dst, num_tokens)
        return completion_after(_engine_device(descriptor), (dst,))

    def scatter(self, src, descriptor, block_ids, num_tokens) -> Completion:
        _scatter(src, descriptor, block_ids, num_tokens)
        return completion_after(_engine_device(descriptor), (src,))


def _engine_device(descriptor):
    # torch ops on a GPU are queued like kernels; on the CPU they finished when they returned.
    return descriptor.streams[0].buffer.device if descriptor.streams else "cpu"
