"""Resolve which native target to build (cuda, hip or none) from the environment and the compilers on PATH.
Owns the KVPORT_TARGET / BUILD_WITH_HIP rules and their one-line errors; must not run a compiler."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping

TARGETS = ("cuda", "hip", "none", "auto")
COMPILERS = {"cuda": "nvcc", "hip": "hipcc"}
# sm_80 (A100) and sm_90 (H100/H200) are the data-centre parts kvport is measured on; 86/89 cover workstation
# cards. The newest entry also embeds PTX so later GPUs can JIT it.
DEFAULT_CUDA_ARCHS = "80;86;89;90"
# gfx90a (MI200) is the newest arch Debian's hipcc (clang 15) knows; ROCm toolchains add gfx942 (MI300).
DEFAULT_HIP_ARCHS = "gfx90a"


class BuildTargetError(RuntimeError):
    """A build request that cannot be honoured; the message is one line naming the variable to change."""


@dataclasses.dataclass(frozen=True)
class BuildTarget:
    name: str  # "cuda", "hip" or "none"
    compiler: str | None  # absolute path of nvcc/hipcc, None for "none"
    archs: tuple[str, ...]
    reason: str  # why this target was chosen (shown by `kvport doctor`)


def resolve_target(
    environ: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
) -> BuildTarget:
    requested = environ.get("KVPORT_TARGET", "").strip().lower()
    if environ.get("BUILD_WITH_HIP", "").strip() in {"1", "true", "yes", "on"}:
        if requested not in {"", "auto", "hip"}:
            raise BuildTargetError(f"BUILD_WITH_HIP=1 conflicts with KVPORT_TARGET={requested}; set only one")
        requested = "hip"
    requested = requested or "auto"
    if requested not in TARGETS:
        raise BuildTargetError(f"KVPORT_TARGET={requested!r} is not a target; expected one of {', '.join(TARGETS)}")
    if requested == "none":
        return BuildTarget("none", None, (), "KVPORT_TARGET=none: pure-Python build (Triton and torch backends)")
    if requested in COMPILERS:
        tool = _compiler(requested, environ, which)
        if tool is None:
            raise BuildTargetError(
                f"KVPORT_TARGET={requested} needs {COMPILERS[requested]} on PATH (or {_env_name(requested)} "
                f"pointing at it); install it or set KVPORT_TARGET=none"
            )
        return BuildTarget(requested, tool, _archs(requested, environ), f"KVPORT_TARGET={requested}")
    for name in ("cuda", "hip"):
        tool = _compiler(name, environ, which)
        if tool is not None:
            return BuildTarget(name, tool, _archs(name, environ), f"auto: found {COMPILERS[name]} at {tool}")
    return BuildTarget(
        "none",
        None,
        (),
        "auto: neither nvcc nor hipcc on PATH, so no native kernels were built "
        "(install a toolchain and reinstall with KVPORT_TARGET=cuda or hip)",
    )


def _env_name(target: str) -> str:
    return {"cuda": "KVPORT_NVCC", "hip": "KVPORT_HIPCC"}[target]


def _compiler(target: str, environ: Mapping[str, str], which: Callable[[str], str | None]) -> str | None:
    explicit = environ.get(_env_name(target))
    if explicit:
        return which(explicit)
    return which(COMPILERS[target])


def _archs(target: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    var, default = ("KVPORT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS) if target == "cuda" else ("KVPORT_HIP_ARCHS", DEFAULT_HIP_ARCHS)
    raw = environ.get(var, default)
    archs = tuple(a.strip() for a in raw.replace(",", ";").split(";") if a.strip())
    if not archs:
        raise BuildTargetError(f"{var}={raw!r} names no architecture; e.g. {default}")
    for arch in archs:
        ok = arch.isdigit() if target == "cuda" else arch.startswith("gfx")
        if not ok:
            example = "80;90" if target == "cuda" else "gfx90a;gfx942"
            raise BuildTargetError(f"{var}: {arch!r} is not an architecture; expected a list like {example}")
    return archs
