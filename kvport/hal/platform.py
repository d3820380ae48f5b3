"""Platform detection: which accelerator family this process can use (cuda, rocm, xpu, hpu, cpu).
Owns the probe logic; must not create a device context, allocate device memory or run at import time."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

PLATFORMS = ("cuda", "rocm", "xpu", "hpu", "cpu")


@dataclasses.dataclass(frozen=True)
class PlatformInfo:
    """What detection found. ``reasons`` says, for every platform not chosen, why not."""

    name: str
    device_name: str | None
    device_count: int
    torch_version: str | None
    reasons: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"reasons": dict(self.reasons)}


def detect_platform(
    torch_module: ModuleType | None = None,
    environ: Mapping[str, str] | None = None,
    find_spec: Callable[[str], Any] = importlib.util.find_spec,
) -> PlatformInfo:
    """Detect the platform. Arguments exist so tests can fake torch and the environment.

    ``KVPORT_PLATFORM`` forces a platform name (used by CI and for reproducing user reports).
    Device queries used here (device count, properties) initialise the driver but create no context.
    """
    environ = os.environ if environ is None else environ
    reasons: dict[str, str] = {}
    if torch_module is None:
        try:
            import torch as torch_module
        except ImportError as exc:  # kvport needs torch, but doctor must still explain itself
            for name in PLATFORMS[:-1]:
                reasons[name] = f"torch is not importable ({exc})"
            return PlatformInfo("cpu", None, 0, None, reasons)
    torch_version = getattr(torch_module, "__version__", None)

    forced = environ.get("KVPORT_PLATFORM")
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(f"KVPORT_PLATFORM={forced!r}: expected one of {', '.join(PLATFORMS)}")
        for name in PLATFORMS:
            if name != forced:
                reasons[name] = f"KVPORT_PLATFORM={forced} forces another platform"
        return PlatformInfo(forced, None, 0, torch_version, reasons)

    for name, probe in (("cuda", _probe_cuda), ("rocm", _probe_rocm), ("xpu", _probe_xpu), ("hpu", _probe_hpu)):
        found = probe(torch_module, environ, find_spec)
        if isinstance(found, str):
            reasons[name] = found
            continue
        count, device_name = found
        return PlatformInfo(name, device_name, count, torch_version, reasons)
    return PlatformInfo("cpu", None, 0, torch_version, reasons)


def _gpu_count(torch_module: ModuleType) -> int:
    cuda = getattr(torch_module, "cuda", None)
    if cuda is None:
        return 0
    try:
        return int(cuda.device_count())
    except Exception:  # a broken driver install reads as "no device", with the reason below
        return 0


def _probe_cuda(torch_module, environ, find_spec) -> tuple[int, str | None] | str:
    version = getattr(torch_module, "version", None)
    if getattr(version, "hip", None):
        return "torch is a ROCm build"
    if not getattr(version, "cuda", None):
        return "torch was built without CUDA"
    count = _gpu_count(torch_module)
    if count == 0:
        return f"torch {torch_module.__version__} has CUDA {version.cuda} but sees no CUDA device"
    return count, torch_module.cuda.get_device_name(0)


def _probe_rocm(torch_module, environ, find_spec) -> tuple[int, str | None] | str:
    version = getattr(torch_module, "version", None)
    if not getattr(version, "hip", None):
        return "torch was built without ROCm (HIP)"
    count = _gpu_count(torch_module)
    if count == 0:
        return f"torch has HIP {version.hip} but sees no ROCm device"
    return count, torch_module.cuda.get_device_name(0)


def _probe_xpu(torch_module, environ, find_spec) -> tuple[int, str | None] | str:
    xpu = getattr(torch_module, "xpu", None)
    if xpu is None:
        return "torch has no xpu module"
    try:
        available = bool(xpu.is_available())
    except Exception as exc:
        return f"torch.xpu.is_available() failed: {exc}"
    if not available:
        return "torch.xpu sees no Intel GPU"
    count = int(xpu.device_count())
    return count, xpu.get_device_name(0)


def _probe_hpu(torch_module, environ, find_spec) -> tuple[int, str | None] | str:
    if find_spec("habana_frameworks") is None:
        return "habana_frameworks (Intel Gaudi software) is not installed"
    # Importing habana_frameworks.torch loads the device runtime, so we only report presence here.
    visible = environ.get("HABANA_VISIBLE_DEVICES", "")
    return (len([d for d in visible.split(",") if d]) or 1), "Intel Gaudi (HPU)"
