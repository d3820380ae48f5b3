"""The CPU halves of the cross-engine test on a GPU (tests/engines/test_cross_engine_gpu.py has the middle): vLLM's
own allocation and writes and SGLang's own stored pages are recorded for the device, which has neither engine; then
SGLang loads, through kvport's HiCache backend, the pages kvport's device kernels stored out of vLLM-shaped GPU KV.
Runs only with KVPORT_XENGINE_DIR (and, for the check, KVPORT_XENGINE_OUT) set: docs/cross-engine.md has the steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.sglang]
pytest.importorskip("vllm")

from sglang_env import import_sglang  # noqa: E402

import_sglang()

import torch  # noqa: E402
from cross_engine_cases import (  # noqa: E402
    DEVICE_OUT_ENV,
    LAYERS,
    PAGES,
    PAIRS,
    RECORD_ENV,
    load_record,
    pair_id,
    save_record,
    view_geometry,
)
from cross_engine_sides import (  # noqa: E402
    as_vllm_tokens,
    sglang_loads,
    sglang_side,
    sglang_stores,
    vllm_info,
)
from sglang_env import random_tokens  # noqa: E402
from vllm_truth import Case, build, write  # noqa: E402

from kvport.engines.vllm_layouts import tensors_in_order  # noqa: E402


def _dir(env: str) -> Path:
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"{env} is not set (a step of the cross-engine GPU test: docs/cross-engine.md)")
    return Path(value)


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_record_for_the_device(backend: str, layout: str, host_layout: str) -> None:
    where = _dir(RECORD_ENV) / pair_id(backend, layout, host_layout)
    shutil.rmtree(where, ignore_errors=True)
    mla = "MLA" in backend
    case = Case(backend, layout, kv_heads=2, head_size=64, layers=LAYERS)
    fresh = build(case)
    page = fresh.block_size
    pools, sglang = sglang_side(mla, host_layout, where / "sglang-l2", page)

    # SGLang -> device: SGLang stores pages; the device loads them into vLLM's blocks, compared with vLLM's own write.
    load_tokens = list(range(6000, 6000 + PAGES * page))
    loaded = sglang_stores(pools, sglang, load_tokens, page, seed=31)
    sglang.close()
    load_blocks = [2, 7, 0]
    theirs = build(case)
    write(theirs, as_vllm_tokens(mla, loaded, load_blocks))

    # device -> SGLang: vLLM's own write of other tokens, uploaded and stored by the device for SGLang to load.
    stored = random_tokens(pools, PAGES * page, torch.Generator().manual_seed(32))
    store_blocks = [5, 1, 3]
    mine = build(case)
    write(mine, as_vllm_tokens(mla, stored, store_blocks))

    views = tensors_in_order(fresh.kv, fresh.names)
    record = {
        "info": vllm_info(fresh),
        "page": page,
        "dtype": views[0].dtype,
        "views": view_geometry(views),
        "initial": fresh.raw().clone(),
        "load": {"tokens": load_tokens, "blocks": load_blocks, "expected": theirs.raw().clone()},
        "store": {
            "tokens": list(range(7000, 7000 + PAGES * page)),
            "blocks": store_blocks,
            "image": mine.raw().clone(),
        },
        "stored_tokens": stored,
    }
    assert not torch.equal(record["initial"], record["load"]["expected"])  # vLLM's write changed the blocks
    save_record(where, record)


@pytest.mark.parametrize("backend,layout,host_layout", PAIRS)
def test_sglang_loads_what_the_device_stored(tmp_path, backend: str, layout: str, host_layout: str) -> None:
    pid = pair_id(backend, layout, host_layout)
    record = load_record(_dir(RECORD_ENV) / pid)
    out = _dir(DEVICE_OUT_ENV) / pid
    results = json.loads((out / "results.json").read_text())
    assert results, f"the device stored nothing for {pid}"
    mla = "MLA" in backend
    page = record["page"]
    for device_backend, result in sorted(results.items()):
        assert result["stored_tokens"] == PAGES * page, (device_backend, result)
        tier_copy = tmp_path / device_backend
        shutil.copytree(out / f"gpu-{device_backend}-l2", tier_copy)  # the fetched files are read-only
        pools, sglang = sglang_side(mla, host_layout, tier_copy, page)
        sglang_loads(pools, sglang, record["store"]["tokens"], page, record["stored_tokens"], mla)
        sglang.close()
