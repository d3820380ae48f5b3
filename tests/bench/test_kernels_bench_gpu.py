"""`kvport bench kernels` rows on a GPU: the plain-memcpy baseline under the GEMM load (the GEMM column's control),
and whole-block chunks (`--whole-blocks`), which block-outer layouts move on the copy engines and others skip."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from small_bench import small_bench  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]


def test_whole_blocks_rows_and_the_memcpy_control_under_load():
    layouts = ["vllm-std-blhnc", "vllm-flash-hnd"]
    bench = small_bench(layouts, ["d2h", "h2d"], ["auto"], ["none", "gemm"], whole_blocks=True)
    records = bench.run()["records"]
    mine = [r for r in records if r["layout"] == "vllm-std-blhnc+whole-blocks" and r["backend"] == "cuda"]
    assert len(mine) == 4 and all("error" not in r and "skipped" not in r for r in mine), mine
    assert all(r["path_used"] == "dma" and r["ratio_to_memcpy"] > 0 for r in mine)  # 16 regions of 2 MiB
    control = [r for r in records if r["backend"] == "memcpy" and r["layout"].startswith("vllm-std-blhnc")]
    assert {r["direction"] for r in control} == {"d2h", "h2d"}
    for r in control:
        assert r["load"] == "gemm" and r["path_used"] == "memcpy" and r["bytes"] == 32 << 20
        assert math.isfinite(r["gemm_ratio"]) and r["gemm_ratio"] > 0 and r["ratio_to_memcpy"] > 0
    # A layer-outer layout has no whole blocks: its rows say why instead of timing something else.
    hnd = [r for r in records if r["layout"] == "vllm-flash-hnd+whole-blocks" and r["backend"] == "cuda"]
    assert hnd and all("block-outer layout" in r["skipped"] for r in hnd)
