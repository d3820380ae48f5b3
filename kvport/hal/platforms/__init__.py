"""Platform behaviour objects: one per vendor (cuda, rocm, xpu, hpu, cpu), owning pinned host memory, streams,
events and synchronisation. Call sites ask these instead of testing device names; detection lives in hal/platform.py."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvport.hal.platform import PlatformInfo
    from kvport.hal.platforms.base import Platform

# platform name -> "module:Class"; imported on first use so that no vendor runtime loads at kvport import.
PLATFORM_CLASSES: dict[str, str] = {
    "cuda": "kvport.hal.platforms.cuda:CudaPlatform",
    "rocm": "kvport.hal.platforms.cuda:RocmPlatform",
    "xpu": "kvport.hal.platforms.xpu:XpuPlatform",
    "hpu": "kvport.hal.platforms.hpu:HpuPlatform",
    "cpu": "kvport.hal.platforms.cpu:CpuPlatform",
}
_instances: dict[str, Platform] = {}


def get_platform(name: str) -> Platform:
    """The behaviour object of platform ``name`` (one instance per process)."""
    if name not in PLATFORM_CLASSES:
        raise ValueError(f"unknown platform {name!r}; known: {', '.join(PLATFORM_CLASSES)}")
    if name not in _instances:
        module_name, _, class_name = PLATFORM_CLASSES[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module_name), class_name)()
    return _instances[name]


def platform_for_device(device, info: PlatformInfo | None = None) -> Platform:
    """The platform that serves engine memory on ``device`` (a torch.device or its string).

    The device type decides, not the machine: a CPU engine on a GPU machine is served by the cpu platform. ROCm
    torch calls its devices "cuda", so a "cuda" device is rocm when torch is a HIP build (or ``info`` says so)."""
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    if kind == "cuda":
        if info is not None:
            return get_platform("rocm" if info.name == "rocm" else "cuda")
        import torch

        return get_platform("rocm" if getattr(torch.version, "hip", None) else "cuda")
    if kind in PLATFORM_CLASSES:
        return get_platform(kind)
    raise ValueError(f"no kvport platform serves engine memory on device type {kind!r}")


__all__ = ["PLATFORM_CLASSES", "get_platform", "platform_for_device"]
