"""DeepSeek V4 on vLLM 0.32: vLLM's own CPU attention layers declare their caches, vLLM groups, lays out and allocates
them; kvport's vLLM adapter refuses them at bind in one line (no layout proven for them), never binds a guess. The
vLLM side runs in its own process (vllm_dsv4_probe.py: vLLM's CPU worker patches torch at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROBE = Path(__file__).with_name("vllm_dsv4_probe.py")


@pytest.mark.parametrize("options", [{}, {"whole_blocks": True}])
def test_deepseek_v4_caches_are_refused_at_bind_in_one_line(tmp_path, options) -> None:
    import kvport

    # The probe imports the kvport this test runs (an installed or a source tree's), wherever it was started.
    here = str(Path(kvport.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # What the refusal rests on, as vLLM 0.32 has it: block-outer layouts only (its DeepSeek V4 indexer backend allows
    # no other), several groups aliasing one buffer, compressed caches storing one state per 4 (or 128) tokens.
    assert got["layout"] in ("BLHNC", "BLNHC")
    assert got["groups"] > 1 and got["storages"] == 1
    assert max(got["tokens_per_state"]) > 1
    refused = got["refused"]
    assert refused and "\n" not in refused, got
