"""Backend selection: priority order, KVPORT_BACKEND, and errors that list every candidate's reason."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvport.hal.platform import PlatformInfo
from kvport.hal.registry import BACKENDS, BackendError, candidates, select_backend

sys.path.insert(0, str(Path(__file__).parent))
MOD = "fake_backends"
CPU = PlatformInfo("cpu", None, 0, "x", {})
TABLE = {"slow": f"{MOD}:Slow", "fast": f"{MOD}:Fast", "medium": f"{MOD}:Medium"}


def test_candidates_in_priority_order_with_reasons():
    found = candidates(CPU, TABLE)
    assert [c.name for c in found] == ["fast", "medium", "slow"]
    assert found[0].verdict.reason == "native module not built"


def test_best_available_is_selected():
    assert select_backend(CPU, environ={}, table=TABLE).name == "medium"


def test_forced_backend_is_used_even_if_slower():
    assert select_backend(CPU, environ={"KVPORT_BACKEND": "slow"}, table=TABLE).name == "slow"


def test_forced_backend_that_cannot_run_lists_every_reason():
    with pytest.raises(BackendError) as info:
        select_backend(CPU, environ={"KVPORT_BACKEND": "fast"}, table=TABLE)
    message = str(info.value)
    assert message.startswith("KVPORT_BACKEND=fast cannot run; candidates:")
    assert "fast: native module not built" in message and "medium: ok" in message and "slow: ok" in message


def test_unknown_forced_backend():
    with pytest.raises(BackendError, match="KVPORT_BACKEND='cuda9' is not a backend; known: fast, medium, slow"):
        select_backend(CPU, environ={"KVPORT_BACKEND": "cuda9"}, table=TABLE)


def test_expected_backend_that_fails_is_an_error_not_a_silent_fallback():
    table = TABLE | {"fast": f"{MOD}:FastExpected"}
    with pytest.raises(BackendError, match="backend fast is expected on cpu but cannot run"):
        select_backend(CPU, environ={}, table=table)


def test_layout_support_is_checked():
    table = {"nolayout": f"{MOD}:NoLayout", "slow": f"{MOD}:Slow"}
    descriptor = SimpleNamespace(layout="vllm-cpu-attn")
    assert select_backend(CPU, descriptor, environ={}, table=table).name == "slow"
    with pytest.raises(BackendError, match="for layout vllm-cpu-attn; candidates: nolayout: opaque blocks"):
        select_backend(CPU, descriptor, environ={"KVPORT_BACKEND": "nolayout"}, table=table)


def test_import_failure_becomes_a_reason():
    found = candidates(CPU, {"ghost": "kvport.no_such_module:Ghost"})
    assert not found[0].verdict.ok
    assert "cannot load: ModuleNotFoundError" in found[0].verdict.reason


def test_real_table_has_torch_and_it_runs_on_cpu():
    assert "torch" in BACKENDS
    assert select_backend(CPU, environ={"KVPORT_BACKEND": "torch"}).name == "torch"
