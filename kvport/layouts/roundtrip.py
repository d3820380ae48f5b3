"""Round-trip and cross-layout checks of a copy backend over layouts (the engine of `kvport selftest` and tests).
Owns the check procedure (random blocks, partial last block, untouched bytes); must not print or parse arguments."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvport.layouts.allocate import EngineKV, allocate
from kvport.layouts.spec import LayoutSpec
from kvport.layouts.tokens import canonical_from_tokens, write_tokens

if TYPE_CHECKING:
    import torch

    from kvport.hal.backend import Backend


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one check moves: token count (last block partial) and, per group, a block count and block ids."""

    num_tokens: int
    num_blocks: tuple[int, ...]
    block_ids: tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


def make_plan(spec: LayoutSpec, generator: torch.Generator, num_tokens: int | None = None) -> Plan:
    """Random token count with a partial last block, and random, non-contiguous, unordered block ids per group."""
    import torch

    biggest = max(g.tokens_per_block for g in spec.groups)
    if num_tokens is None:
        num_tokens = int(torch.randint(biggest + 1, 3 * biggest, (1,), generator=generator))
        if num_tokens % spec.groups[0].tokens_per_block == 0:
            num_tokens -= 1  # keep the first group's last block partial
    counts, tables = [], []
    for g in spec.groups:
        need = -(-num_tokens // g.tokens_per_block)
        total = 2 * need + 3  # room for gaps: ids are picked from twice the blocks needed
        counts.append(total)
        tables.append(tuple(int(b) for b in torch.randperm(total, generator=generator)[:need]))
    return Plan(num_tokens, tuple(counts), tuple(tables))


def _ids(spec: LayoutSpec, plan: Plan) -> list:
    return list(plan.block_ids[0]) if len(spec.groups) == 1 else [list(t) for t in plan.block_ids]


def _fork(generator: torch.Generator) -> torch.Generator:
    import torch

    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return twin


def _compare_storages(got: EngineKV, want: EngineKV, before: list[torch.Tensor]) -> str:
    """Empty when equal, else which bytes differ and how many of them should have stayed untouched."""
    bad = outside = 0
    for g_raw, w_raw, b_raw in zip(got.storages, want.storages, before):
        g_raw, w_raw = g_raw.cpu(), w_raw.cpu()
        diff = g_raw != w_raw
        bad += int(diff.sum())
        outside += int((diff & (w_raw == b_raw)).sum())
    if not bad:
        return ""
    return f"{bad} engine bytes differ from the expected state ({outside} of them outside the addressed slots)"


STAGINGS = ("device", "host")


def staging_buffer(nbytes: int, device, staging: str) -> torch.Tensor:
    """Random uint8 staging memory: on the engine device, or pinned host memory (what UVA kernels write)."""
    import torch

    if staging not in STAGINGS:  # anything else would quietly test the host path under another name
        raise ValueError(f"staging {staging!r} is not one of {', '.join(STAGINGS)}")
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if staging == "device":
        return data.to(device)
    return data.pin_memory() if torch.device(device).type != "cpu" else data


def gather_checked(
    spec: LayoutSpec, kv: EngineKV, plan: Plan, backend: Backend, device, staging: str = "device"
) -> tuple[torch.Tensor, str]:
    """Gather through the backend into device or pinned-host staging; compare with the token oracle."""
    import torch

    ids = _ids(spec, plan)
    need = kv.descriptor.canonical_bytes(plan.num_tokens)
    # One guard byte past the chunk: a backend writing past canonical_bytes is caught.
    dst = staging_buffer(need + 1, device, staging)
    guard = dst[need:].clone()
    backend.gather(kv.descriptor, ids, dst, plan.num_tokens).wait()  # results are read only once it finished
    want = canonical_from_tokens(spec, kv.tensors, ids, plan.num_tokens)
    got = dst[:need].cpu()
    if not torch.equal(got, want):
        first = int((got != want).nonzero()[0])
        return dst[:need], f"gather: {int((got != want).sum())} of {need} canonical bytes wrong (first at {first})"
    if not torch.equal(dst[need:], guard):
        return dst[:need], "gather: wrote past the end of the canonical chunk"
    return dst[:need], ""


def scatter_checked(
    spec: LayoutSpec, chunk: torch.Tensor, plan: Plan, backend: Backend, device, generator: torch.Generator
) -> str:
    """Scatter ``chunk`` into a fresh random cache; every addressed byte right, every other byte untouched."""
    twin = _fork(generator)
    target = allocate(spec, list(plan.num_blocks), device=device, generator=generator)
    expected = allocate(spec, list(plan.num_blocks), device=device, generator=twin)
    before = [s.cpu().clone() for s in expected.storages]
    ids = _ids(spec, plan)
    write_tokens(spec, expected.tensors, ids, plan.num_tokens, chunk.cpu())
    backend.scatter(chunk, target.descriptor, ids, plan.num_tokens).wait()
    problem = _compare_storages(target, expected, before)
    return f"scatter: {problem}" if problem else ""


def roundtrip(
    spec: LayoutSpec, backend: Backend, device: str = "cpu", seed: int = 0, staging: str = "device"
) -> CheckResult:
    """Gather a random block set from random engine tensors, scatter it into a fresh cache, compare bytes."""
    plan, source, problem = _gather_then_scatter(spec, spec, backend, device, seed, staging)
    where = f"{plan.num_tokens} tokens, {source.descriptor.canonical_bytes(plan.num_tokens)} bytes"
    return CheckResult(not problem, f"{where}: {problem}" if problem else where)


def cross(
    a: LayoutSpec, b: LayoutSpec, backend: Backend, device: str = "cpu", seed: int = 0, staging: str = "device"
) -> CheckResult:
    """Gather from layout ``a``, scatter into layout ``b`` (same canonical fingerprint), compare token values."""
    if a.canonical_fingerprint() != b.canonical_fingerprint():
        return CheckResult(False, f"{a.name} and {b.name} have different canonical fingerprints")
    plan, _, problem = _gather_then_scatter(a, b, backend, device, seed, staging)
    return CheckResult(not problem, problem or f"{plan.num_tokens} tokens")


def _gather_then_scatter(
    a: LayoutSpec, b: LayoutSpec, backend: Backend, device, seed: int, staging: str
) -> tuple[Plan, EngineKV, str]:
    """Random ``a`` tensors, gathered and checked; the chunk scattered into a fresh ``b`` cache and checked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(a, gen)
    source = allocate(a, list(plan.num_blocks), device=device, generator=gen)
    chunk, problem = gather_checked(a, source, plan, backend, device, staging)
    if not problem:
        problem = scatter_checked(b, chunk, make_plan(b, gen, plan.num_tokens), backend, device, gen)
    return plan, source, problem
