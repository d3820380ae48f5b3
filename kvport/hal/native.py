"""What the native module is: which target it was built for (from _build_info.json), whether it loads, and why not.
Owns locating and importing kvport._native_<target>; must not create a device context or launch kernels."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"
NATIVE_TARGETS = ("cuda", "hip")


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    target: str  # "cuda", "hip", "none" or "unknown" (no build record: a source tree, not an install)
    archs: tuple[str, ...]
    loadable: bool  # the module imports
    reason: str
    runtime: dict[str, Any] | None = None
    usable: bool = False  # it imports and its runtime sees at least one device (known only with query_runtime)
    # Copy-engine regions described in batched calls (CUDA >= 12.8) or one call per region (HIP, older CUDA: the
    # planner then keeps small regions off the copy engines); None when the module does not load.
    batched_copies: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"archs": list(self.archs)}


def read_build_info(path: Path = BUILD_INFO) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"target": "unknown", "reason": f"{path.name} is unreadable: {exc}"}


def has_batched_copies(module: ModuleType) -> bool:
    """Whether a loaded native module describes copy-engine regions in batched calls (cudaMemcpyBatchAsync, CUDA >=
    12.8); HIP and older CUDA builds issue one async copy per region (kvport/kernels/cuda/memcpy_batch.cu)."""
    return bool(getattr(module, "HAS_BATCHED_MEMCPY", False))


def load_native(target: str) -> ModuleType:
    """Import kvport._native_<target>; raises ImportError with the loader's reason."""
    if target not in NATIVE_TARGETS:
        raise ImportError(f"no native module for target {target!r}")
    return importlib.import_module(f"kvport._native_{target}")


def native_status(query_runtime: bool = False, build_info_path: Path = BUILD_INFO) -> NativeStatus:
    """The native module's state. ``query_runtime`` also asks the vendor runtime for device count and versions
    (driver initialisation only, no context), which doctor wants and import-time code must not do."""
    info = read_build_info(build_info_path)
    if info is None:
        found = [t for t in NATIVE_TARGETS if _importable(t)]
        if not found:
            return NativeStatus(
                "unknown",
                (),
                False,
                "no build record and no native module: running from a source tree "
                "(install with `pip install .` to build native kernels)",
            )
        info = {"target": found[0], "archs": [], "reason": "native module found without a build record"}
    target = info.get("target", "unknown")
    archs = tuple(info.get("archs") or ())
    if target not in NATIVE_TARGETS:
        return NativeStatus(target, archs, False, info.get("reason", "built without native kernels"))
    try:
        module = load_native(target)
    except ImportError as exc:
        return NativeStatus(
            target, archs, False, f"built for {target} but kvport._native_{target} does not load: {exc}"
        )
    archs = archs or tuple(a for a in str(getattr(module, "ARCHS", "")).split(";") if a)
    batched = has_batched_copies(module)
    runtime = None
    if query_runtime:
        runtime = dict(module.runtime_info())
        if runtime.get("error") or runtime.get("device_count", 0) == 0:
            why = runtime.get("error") or "no device"
            reason = f"kvport._native_{target} loads; {target} runtime: {why}"
            return NativeStatus(target, archs, True, reason, runtime, batched_copies=batched)
    loads = f"kvport._native_{target} loads ({info.get('reason', 'built')})"
    return NativeStatus(target, archs, True, loads, runtime, usable=query_runtime, batched_copies=batched)


def _importable(target: str) -> bool:
    try:
        load_native(target)
    except ImportError:
        return False
    return True
