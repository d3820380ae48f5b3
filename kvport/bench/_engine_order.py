"""`kvport bench kernels --load engine`: each transfer ordered after an engine step on the engine's own stream and
the next step after its release, as the vLLM worker orders loads (and stores with ``async_stores: false``);
`--load engine-async`: the next step not ordered after the store (vLLM's default asynchronous stores), so what the
store costs the engine is that step's speed. Owns that timing; must not pick paths.

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


def engine_ordered(step: Callable[[], None], enqueue: Callable[[], object], reps: int) -> tuple[float, float, float]:
    """Medians over ``reps`` rounds of: ``step()`` on the current stream, ``enqueue()`` (issues one transfer after
    it, maybe orders the current stream after its release; returns its Completion), the next step: (ms from a
    step's end to the transfer's last byte, ms from the step's end until the next step may start, the next step's
    speed as a ratio to the first's: below 1 where the transfer slows it). Rounds are apart (the host waits between
    them), so a transfer never queues behind the previous one and every first step runs alone."""
    side = torch.cuda.Stream()
    ends, resumes, speeds = [], [], []
    torch.cuda.synchronize()
    for _ in range(reps):
        start, ready, done, resume, after = (torch.cuda.Event(enable_timing=True) for _ in range(5))
        start.record()
        step()
        ready.record()
        completion = enqueue()
        resume.record()
        side.wait_event(ready)
        completion.wait_on_all(side)
        done.record(side)
        step()  # the next step: it waits for what enqueue() ordered the current stream after
        after.record()
        torch.cuda.synchronize()
        ends.append(ready.elapsed_time(done))
        resumes.append(ready.elapsed_time(resume))
        speeds.append(start.elapsed_time(ready) / resume.elapsed_time(after))
    return statistics.median(ends), statistics.median(resumes), statistics.median(speeds)


def memcpy_enqueue(direction: str, nbytes: int, device, release_wait: bool = True) -> Callable[[], _CopyDone]:
    """One plain pinned copy of ``nbytes`` in engine order: on a side stream after the current stream's work, and
    (``release_wait``) the current stream after its end (a plain copy uses engine memory until its last byte)."""
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
        if release_wait:
            current.wait_event(end)
        return _CopyDone(end)

    return copy
