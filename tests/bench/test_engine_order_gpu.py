"""`kvport bench kernels --load engine` on a GPU: transfers in the engine's own order are timed against a plain copy
issued the same way; a staged store gives the next step its memory back before a plain copy would (its gathers
end before the copy to the host), and cases it cannot time are skipped with the reason."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from small_bench import small_bench  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]


def test_engine_order_records_latency_ratio_and_the_next_steps_wait():
    bench = small_bench(["vllm-mla"], ["d2h", "h2d", "d2d"], ["staged"], ["engine"], repeat=5)
    records = bench.run()["records"]
    # The baselines every run adds: per-block copies cannot be timed in engine order (skipped with the reason).
    per_block = [r for r in records if r["backend"] == "per-block"]
    assert per_block and all("engine order" in r["skipped"] for r in per_block)
    by_dir = {r["direction"]: r for r in records if r["backend"] == "cuda"}
    assert "skipped" in by_dir["d2d"] and "engine order" in by_dir["d2d"]["skipped"]
    for direction in ("d2h", "h2d"):
        r = by_dir[direction]
        assert "error" not in r, r.get("error")
        assert r["load"] == "engine" and r["path_used"] == "staged"
        assert 0 < r["ratio_to_memcpy"] and r["ms"] > 0 and r["engine_wait_ms"] >= 0 and r["memcpy_engine_wait_ms"] > 0
    store = by_dir["d2h"]
    # A plain copy holds engine memory to its last byte; the staged store only until its gather ended.
    assert store["engine_wait_ms"] < store["memcpy_engine_wait_ms"]


def test_engine_async_store_leaves_the_next_step_free():
    """`--load engine-async`: the next step is not ordered after the store, so it starts long before the store's
    last byte (a plain copy issued the same way is the reference); loads are refused with the reason."""
    bench = small_bench(["vllm-flash-nhd"], ["d2h", "h2d"], ["staged"], ["engine-async"], repeat=5)
    records = [r for r in bench.run()["records"] if r["backend"] == "cuda"]
    by_dir = {r["direction"]: r for r in records}
    assert "ordered before the forward" in by_dir["h2d"]["skipped"]
    store = by_dir["d2h"]
    assert "error" not in store, store.get("error")
    assert store["load"] == "engine-async" and store["path_used"] == "staged"
    assert store["engine_wait_ms"] < store["ms"] / 2, "the next step waited for the store"
    assert 0 < store["gemm_ratio"] <= 1.5


def test_auto_picks_by_whether_the_next_step_waits():
    """`auto` in engine order (the next step waits for the release): the one-call staged chunk; asynchronous (it
    does not): the copy engines, as with no engine at all."""
    from kvport.testing.gpu import native_or_none

    if native_or_none() is None:
        pytest.skip("the DMA path needs the native module")
    bench = small_bench(["vllm-flash-nhd"], ["d2h"], ["auto"], ["engine", "engine-async"])
    used = {r["load"]: r["path_used"] for r in bench.run()["records"] if r["backend"] == "cuda"}
    assert used == {"engine": "staged", "engine-async": "dma"}
