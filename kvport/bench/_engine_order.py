"""`kvport bench kernels --load engine`: each transfer ordered after an engine step on the engine's own stream and
the next step after its release, as the vLLM worker orders stores and loads. Owns that timing; must not pick paths.

The `gemm` load runs GEMMs on a stream of their own, so a transfer's kernels wait for SMs at some point inside a
GEMM: the worst case (another engine on the GPU). Here a transfer becomes ready at a step's end, where kvport's
high-priority stream gets the SMs first (docs/performance.md, "A store ordered after the engine's own stream")."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


class _CopyDone:
    """What a plain copy offers in place of a Completion: one event at its end."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def wait_on_all(self, stream) -> None:
        stream.wait_event(self.event)


def engine_ordered(step: Callable[[], None], enqueue: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median ms from a step's end to the transfer's last byte, median ms from the step's end until the next step
    may start) over ``reps`` rounds of: ``step()`` on the current stream, ``enqueue()`` (issues one transfer after
    it and orders the current stream after its release; returns its Completion), the next step. Rounds are apart
    (the host waits between them), so a transfer never queues behind the previous one."""
    side = torch.cuda.Stream()
    ends, resumes = [], []
    torch.cuda.synchronize()
    for _ in range(reps):
        ready, done, resume = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        step()
        ready.record()
        completion = enqueue()
        resume.record()
        side.wait_event(ready)
        completion.wait_on_all(side)
        done.record(side)
        step()  # the next step: it waits for what enqueue() ordered the current stream after
        torch.cuda.synchronize()
        ends.append(ready.elapsed_time(done))
        resumes.append(ready.elapsed_time(resume))
    return statistics.median(ends), statistics.median(resumes)


def memcpy_enqueue(direction: str, nbytes: int, device) -> Callable[[], _CopyDone]:
    """One plain pinned copy of ``nbytes`` in engine order: on a side stream after the current stream's work, and
    the current stream after its end (a plain copy uses engine memory until its last byte)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    copy_stream = torch.cuda.Stream(device)

    def copy() -> _CopyDone:
        current = torch.cuda.current_stream()
        copy_stream.wait_stream(current)
        with torch.cuda.stream(copy_stream):
            if direction == "d2h":
                host.copy_(dev, non_blocking=True)
            else:
                dev.copy_(host, non_blocking=True)
        end = torch.cuda.Event()
        end.record(copy_stream)
        current.wait_event(end)
        return _CopyDone(end)

    return copy
