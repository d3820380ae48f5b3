"""`kvport bench kernels --load gemm`: transfers back to back while a GEMM loop runs on another stream, and what
each costs the other. Owns that timing (windows, solo references, medians); must not pick paths or build cases."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

# Windows per case, median reported. One window's GEMM ratio against the solo speed measured just before it spread
# 0.87-1.01 for a plain pinned copy under the same load on an H200 (2026-11-30, docs/performance.md, "The GEMM
# column's baseline"): sustained GEMMs change speed as clocks and power settle. Three windows, each between two solo
# measurements of the same length, trade 3x the case's time for a steadier figure.
TRIALS = 3


def timing_events(n: int) -> list[torch.cuda.Event]:
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def timed_window(enqueue: Callable[[], object], reps: int, finish: Callable[[object], None]) -> tuple:
    """Queue ``reps`` transfers back to back between two timing events: (start, end). ``finish(last)`` orders the
    end after the last transfer's last byte; nothing waits on the host."""
    start, end = timing_events(2)
    start.record()
    last = None
    for _ in range(reps):
        last = enqueue()
    finish(last)
    end.record()
    return start, end


def _steps_ms(load: torch.cuda.Stream, step: Callable[[], None], n: int) -> list[tuple[torch.cuda.Event, ...]]:
    """Queue ``n`` load steps on ``load``, each between two events; returns the event pairs."""
    events = timing_events(n + 1)
    with torch.cuda.stream(load):
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
    return [(events[i], events[i + 1]) for i in range(n)]


def under_load(
    enqueue: Callable[[], object], finish: Callable[[object], None], step: Callable[[], None], reps: int, n_steps: int
) -> tuple[float, float]:
    """(ms per transfer, GEMM speed as a ratio to solo), medians over TRIALS windows. A window: ``n_steps`` solo load
    steps, then ``reps`` transfers (``enqueue``; ``finish(last)`` orders the window's end after the last one's last
    byte) started together with ``n_steps`` load steps on another stream, then ``n_steps`` solo steps again. The
    GEMM ratio is the mean solo step (before and after) over the mean loaded step that ran entirely inside the
    transfer window."""
    device = torch.cuda.current_device()
    load = torch.cuda.Stream(device)
    times, ratios = [], []
    for _ in range(TRIALS):
        torch.cuda.synchronize()
        before = _steps_ms(load, step, n_steps)
        torch.cuda.synchronize()
        load.wait_stream(torch.cuda.current_stream())
        loaded = _steps_ms(load, step, n_steps)
        start, end = timed_window(enqueue, reps, finish)
        torch.cuda.synchronize()
        after = _steps_ms(load, step, n_steps)
        torch.cuda.synchronize()
        window = start.elapsed_time(end)
        inside = []
        for g0, g1 in loaded:
            t0, t1 = start.elapsed_time(g0), start.elapsed_time(g1)
            if t0 >= 0.0 and t1 <= window:
                inside.append(t1 - t0)
        solo = statistics.mean(a.elapsed_time(b) for a, b in before + after)
        times.append(window / reps)
        ratios.append(solo / statistics.mean(inside) if inside else float("nan"))
    return statistics.median(times), statistics.median(ratios)
