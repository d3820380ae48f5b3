"""The backend registry: which copy backends exist, which can run here, and which one a transfer uses.
Owns candidate order and the selection rules; must not contain copy code or import backends at module import."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kvport.hal.backend import Backend, Verdict

if TYPE_CHECKING:
    from kvport.hal.platform import PlatformInfo
    from kvport.layouts.descriptor import CopyDescriptor

# name -> "module:Class". Modules are imported only when a backend is probed, so a broken optional
# dependency (say Triton) shows up as that backend's reason, never as an import error of kvport.
BACKENDS: dict[str, str] = {
    "torch": "kvport.hal.backends.torch_ref:TorchBackend",
    "triton": "kvport.hal.backends.triton:TritonBackend",
    "cuda": "kvport.hal.backends.native:CudaBackend",
    "hip": "kvport.hal.backends.native:HipBackend",
}


class BackendError(RuntimeError):
    """No backend can serve a request; the message lists every candidate and why it was refused."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    priority: int
    verdict: Verdict
    backend: Backend | None


def load_backend(name: str, table: Mapping[str, str] | None = None) -> Backend:
    table = BACKENDS if table is None else table
    if name not in table:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(table)}")
    module_name, _, class_name = table[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)()


def candidates(platform: PlatformInfo, table: Mapping[str, str] | None = None) -> list[Candidate]:
    """Every registered backend with its verdict for this platform, in priority order (best first)."""
    table = BACKENDS if table is None else table
    found = []
    for name in table:
        try:
            backend = load_backend(name, table)
        except Exception as exc:  # any import failure is that backend's reason, shown by doctor
            found.append(Candidate(name, -1, Verdict.no(f"cannot load: {type(exc).__name__}: {exc}"), None))
            continue
        try:
            verdict = backend.available(platform)
        except Exception as exc:
            verdict = Verdict.no(f"availability probe failed: {type(exc).__name__}: {exc}")
        found.append(Candidate(name, backend.priority, verdict, backend))
    return sorted(found, key=lambda c: -c.priority)


def select_backend(
    platform: PlatformInfo,
    descriptor: CopyDescriptor | None = None,
    environ: Mapping[str, str] | None = None,
    table: Mapping[str, str] | None = None,
) -> Backend:
    """The backend to use: ``KVPORT_BACKEND`` if set (and it must work), else the best that can run here.

    A backend whose ``expected(platform)`` says it should run here (e.g. the native module was built for this
    platform) but cannot is an error, not a silent step down to a slower backend.
    """
    environ = os.environ if environ is None else environ
    forced = environ.get("KVPORT_BACKEND", "").strip()
    found = candidates(platform, table)
    if forced and forced not in {c.name for c in found}:
        raise BackendError(f"KVPORT_BACKEND={forced!r} is not a backend; known: {', '.join(c.name for c in found)}")
    reasons, blocker = [], None
    for cand in found:
        verdict = cand.verdict
        if verdict.ok and descriptor is not None:
            verdict = cand.backend.supports(descriptor)
        reasons.append(f"{cand.name}: {verdict.reason}")
        if forced and cand.name != forced:
            continue
        if verdict.ok and blocker is None:
            return cand.backend
        if forced:
            blocker = f"KVPORT_BACKEND={forced} cannot run"
        elif blocker is None and cand.backend is not None and cand.backend.expected(platform):
            blocker = f"backend {cand.name} is expected on {platform.name} but cannot run"
    layout = f" for layout {descriptor.layout}" if descriptor is not None else ""
    head = blocker or f"no backend can run on {platform.name}"
    raise BackendError(f"{head}{layout}; candidates: " + "; ".join(reasons))
