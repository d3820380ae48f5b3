"""The native copy-engine call runs without the GIL: the driver holds the calling thread ~0.5-0.9 us per region, and
the engine's other Python threads (its scheduler, kvport's completion watcher) must keep running meanwhile."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from kvport.testing.gpu import backend_or_skip  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

REGIONS, REGION = 65536, 4096  # ~30-60 ms of driver time on an H200 host: long enough to see a frozen thread


def test_other_python_threads_run_during_a_batched_copy_call():
    native = backend_or_skip("cuda")
    pool = torch.empty(REGIONS * REGION * 2, dtype=torch.uint8, device="cuda")
    host = torch.empty(REGIONS * REGION, dtype=torch.uint8, pin_memory=True)
    # Every other 4 KiB slot of the pool, so no two regions join into one.
    srcs = torch.arange(REGIONS, dtype=torch.int64) * (2 * REGION) + pool.data_ptr()
    dsts = torch.arange(REGIONS, dtype=torch.int64) * REGION + host.data_ptr()
    sizes = torch.full((REGIONS,), REGION, dtype=torch.int64)
    stamps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        deadline = time.perf_counter() + 10.0
        while not stop.is_set() and time.perf_counter() < deadline:
            stamps.append(time.perf_counter())

    side = torch.cuda.Stream()
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    while not stamps:
        time.sleep(0.001)
    with torch.cuda.stream(side):
        start = time.perf_counter()
        native.memcpy_regions(dsts, srcs, sizes, max_batch=1024)
        end = time.perf_counter()
    stop.set()
    thread.join()
    side.synchronize()
    call = end - start
    if call < 0.005:
        pytest.skip(f"the call took {call * 1e3:.1f} ms: too short to tell a frozen thread from a running one")
    inside = [t for t in stamps if start <= t <= end]
    gaps = [b - a for a, b in zip([start, *inside], [*inside, end])]
    # Holding the GIL would leave one gap as long as the call; running threads tick every few microseconds (a GIL
    # hand-over can take up to the 5 ms switch interval).
    longest = max(gaps)
    assert longest < call / 2, f"the other thread paused {longest * 1e3:.1f} ms of a {call * 1e3:.1f} ms call"
    assert torch.equal(host[:REGION].cuda(), pool[:REGION])
