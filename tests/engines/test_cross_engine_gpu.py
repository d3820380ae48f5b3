"""The GPU half of the cross-engine test: vLLM-shaped KV on the device (vLLM's own allocation geometry and bytes,
recorded on the CPU by test_cross_engine_record.py), loaded from pages SGLang stored and compared byte for byte with
vLLM's own write, and stored by kvport's device kernels for SGLang to load back on the CPU. Needs KVPORT_XENGINE_DIR
(the record) and KVPORT_XENGINE_OUT (where the stored pages go); docs/cross-engine.md has the steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cross_engine_cases import (
    DEVICE_OUT_ENV,
    PAGES,
    PAIRS,
    RECORD_ENV,
    load_record,
    pair_id,
    views_of,
    vllm_cache,
)

from kvport.engines.vllm_layouts import load_for
from kvport.layouts import compile_descriptor

pytestmark = pytest.mark.gpu
BACKENDS = ["cuda", "triton"]


def _dirs() -> tuple[Path, Path]:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    record, out = os.environ.get(RECORD_ENV), os.environ.get(DEVICE_OUT_ENV)
    if not (record and out):
        pytest.skip(f"{RECORD_ENV} and {DEVICE_OUT_ENV} are not set (docs/cross-engine.md)")
    return Path(record), Path(out)


def _on_device(record, image: torch.Tensor):
    raw = image.to("cuda")
    return raw, views_of(raw, record["views"], record["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vllm_backend,layout,host_layout", PAIRS)
def test_sglang_pages_into_vllm_gpu_kv_and_back(tmp_path, backend, vllm_backend, layout, host_layout) -> None:
    record_dir, out_dir = _dirs()
    pid = pair_id(vllm_backend, layout, host_layout)
    record = load_record(record_dir / pid)
    page, spec = record["page"], load_for(record["info"])

    # SGLang's pages into vLLM's blocks on the GPU: every byte as vLLM's own write of the same tokens left it.
    shutil.copytree(record_dir / pid / "sglang-l2", tmp_path / "sglang-l2")
    raw, views = _on_device(record, record["initial"])
    cache = vllm_cache(page, tmp_path / "sglang-l2", compile_descriptor(spec, views), backend)
    assert cache.stats()["backend"].startswith(backend), cache.stats()["backend"]
    load = record["load"]
    assert cache.lookup(load["tokens"] + [1, 2]) == PAGES * page
    assert cache.load(load["tokens"], load["blocks"], PAGES * page) == PAGES * page
    differ = int((raw.cpu() != load["expected"]).sum())
    assert differ == 0, f"{pid} on {backend}: {differ} bytes unlike vLLM's own write"
    cache.close()

    # vLLM's own write, uploaded, stored by the device kernels for SGLang (test_cross_engine_record.py checks it).
    store = record["store"]
    raw, views = _on_device(record, store["image"])
    target = out_dir / pid / f"gpu-{backend}-l2"
    shutil.rmtree(target, ignore_errors=True)
    cache = vllm_cache(page, target, compile_descriptor(spec, views), backend)
    stored = cache.store(store["tokens"], store["blocks"])
    backend_name = cache.stats()["backend"]
    cache.close()
    assert stored == PAGES * page
    results_file = out_dir / pid / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[backend] = {"stored_tokens": stored, "kvport_backend": backend_name}
    results_file.write_text(json.dumps(results, indent=1))
