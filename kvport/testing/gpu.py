"""GPU-test helpers: the copy backend a test names (skipped with its reason where it cannot run here) and the torch
reference gather that transfers are compared with byte for byte. Test scaffolding; runtime code must not import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvport.hal.backend import Backend
    from kvport.layouts.descriptor import CopyDescriptor


def backend_or_skip(name: str) -> Backend:
    """The registry's backend ``name``; the calling test is skipped, with the registry's reason, where it cannot run."""
    import pytest

    from kvport.hal.platform import detect_platform
    from kvport.hal.registry import candidates

    found = {c.name: c for c in candidates(detect_platform())}
    cand = found.get(name)
    if cand is None:
        raise ValueError(f"unknown backend {name!r}: expected one of {sorted(found)}")
    if not cand.verdict.ok:
        pytest.skip(f"{name}: {cand.verdict.reason}")
    return cand.backend


def native_or_none() -> Backend | None:
    """The native CUDA/HIP backend (the copy engines' driver for the DMA path), or None where it cannot run."""
    from kvport.hal.platform import detect_platform
    from kvport.hal.registry import candidates

    for cand in candidates(detect_platform()):
        if cand.name == "cuda" and cand.verdict.ok:
            return cand.backend
    return None


def reference_gather(descriptor: CopyDescriptor, tables, tokens: int, device: str = "cuda") -> torch.Tensor:
    """The canonical bytes of ``tokens`` tokens at block ids ``tables``, gathered by the torch reference backend
    into a fresh buffer on ``device``, after the device finished everything issued before."""
    import torch

    from kvport.hal.backends.torch_ref import TorchBackend

    out = torch.empty(descriptor.canonical_bytes(tokens), dtype=torch.uint8, device=device)
    torch.cuda.synchronize()
    TorchBackend().gather(descriptor, tables, out, tokens)
    torch.cuda.synchronize()
    return out
