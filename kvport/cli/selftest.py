"""`kvport selftest`: round-trip layouts through a backend; check bytes, untouched blocks and cross-layout moves.
Owns argument handling and the one-line-per-check report; the checks themselves live in kvport.layouts.roundtrip."""

from __future__ import annotations

import argparse
import functools
import zlib

from kvport.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout", action="append", default=[], metavar="NAME|FILE", help="layout to test (repeatable; default: all)"
    )
    parser.add_argument("--backend", help="backend name from the registry (default: the best one for each layout)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for data, block ids and token counts")
    parser.add_argument("--device", default="cpu", help="device for the engine tensors, e.g. cpu or cuda")
    parser.add_argument(
        "--staging",
        choices=("device", "host"),
        default="device",
        help="where canonical chunks land: device memory, or pinned host memory (the UVA path)",
    )
    parser.add_argument("--no-cross", action="store_true", help="skip the cross-layout transfers")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvport.hal.platform import detect_platform
    from kvport.hal.registry import BackendError, load_backend, select_backend
    from kvport.layouts import allocate, catalog_names, load_layout
    from kvport.layouts.roundtrip import cross, roundtrip

    device = _device(torch, args.device)
    names = args.layout or catalog_names()
    specs = [load_layout(name) for name in names]
    for spec in specs:
        _check_memory(spec)
    platform = detect_platform()
    forced = None
    if args.backend:
        try:
            forced = load_backend(args.backend)
        except BackendError as exc:
            raise UserError(f"--backend: {exc}") from None
        except Exception as exc:  # the backend module itself fails to import: its reason, one line
            print(f"FAIL backend {args.backend}: cannot load: {type(exc).__name__}: {exc}")
            return 1
        verdict = forced.available(platform)
        if not verdict:
            print(f"FAIL backend {args.backend}: not available on {platform.name}: {verdict.reason}")
            return 1

    def backend_for(spec):
        descriptor = allocate(spec, 1, device=device, fill="zeros").descriptor
        if forced is not None:
            verdict = forced.supports(descriptor)
            return (forced, "") if verdict else (None, verdict.reason)
        try:
            return select_backend(platform, descriptor), ""
        except BackendError as exc:
            return None, str(exc)

    failures = skipped = passed = 0
    tag = "" if args.staging == "device" else ", host staging"
    width = max(len(s.name) for s in specs) + 6
    chosen = {}
    for spec in specs:
        backend, why = backend_for(spec)
        chosen[spec.name] = backend
        if backend is None:
            print(f"skip {spec.name:{width}} [{args.backend or '-'}/{device}] {why}")
            skipped += 1
            continue
        result = _guard(
            functools.partial(roundtrip, spec, backend, str(device), _seed(args.seed, spec.name), args.staging)
        )
        ok = _report(result.ok, f"{spec.name:{width}}", f"{backend.name}/{device}{tag}", result.detail)
        passed, failures = passed + ok, failures + (not ok)

    if not args.no_cross:
        pool = {s.name: s for s in specs}
        for name in catalog_names():
            if name not in pool:  # not setdefault: it would parse the file even when the name is already there
                pool[name] = load_layout(name)
        fingerprints = {name: p.canonical_fingerprint() for name, p in pool.items()}

        @functools.cache
        def forced_supports(name: str) -> bool:
            return backend_for(pool[name])[0] is not None

        for spec in specs:
            backend = chosen.get(spec.name)
            mine = spec.canonical_fingerprint()
            partners = [p for name, p in pool.items() if p.name != spec.name and fingerprints[name] == mine]
            if backend is None or not partners:
                continue
            bad = []
            for partner in partners:
                if forced is not None and not forced_supports(partner.name):
                    continue
                seed = _seed(args.seed, spec.name + ">" + partner.name)
                result = _guard(functools.partial(cross, spec, partner, backend, str(device), seed, args.staging))
                if not result.ok:
                    bad.append(f"{partner.name}: {result.detail}")
            label = f"cross {spec.name} -> {len(partners)} compatible"
            ok = _report(not bad, label, f"{backend.name}/{device}{tag}", "; ".join(bad))
            passed, failures = passed + ok, failures + (not ok)
    print(f"selftest: {passed} passed, {failures} failed, {skipped} skipped (seed {args.seed})")
    return 1 if failures else 0


def _report(ok: bool, label: str, where: str, detail: str) -> bool:
    """Print one check's line (``ok``/``FAIL``, label, [backend/device], detail) and return ``ok`` for counting."""
    print(f"{'ok  ' if ok else 'FAIL'} {label} [{where}]" + (f" {detail}" if detail else ""))
    return ok


def _guard(check):
    """Run one check; a backend exception becomes that check's one-line failure, not a traceback."""
    from kvport.layouts.roundtrip import CheckResult

    try:
        return check()
    except UserError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        return CheckResult(False, f"{type(exc).__name__}: {text}")


def _check_memory(spec) -> None:
    """Refuse, before allocating, a layout whose round trip needs more host memory than is available now: a spec
    within kvport.layouts.limits can still need tens of GB here, and an out-of-memory kill is not a report."""
    from kvport.layouts.limits import group_block_bytes
    from kvport.machine import available_memory

    # Mirrors roundtrip.make_plan: up to 3 blocks of the coarsest group's tokens, 2 * need + 3 blocks per group, and
    # the canonical chunk of those tokens. The check holds several copies at once (source, target, expected, a
    # snapshot, comparison masks, the oracle's chunk): peak RSS was 3.1 GB for a 302 MB plan + 98 MB chunk
    # (vllm-flash-nhd, head_dim 131072, torch backend, 2-core dev VM), 7.8x; 21 GB for 3.07 GB at head_dim 10**6,
    # 6.9x; 8x is the estimate.
    tokens = 3 * max(g.tokens_per_block for g in spec.groups)
    engine = sum((2 * -(-tokens // g.tokens_per_block) + 3) * group_block_bytes(g) for g in spec.groups)
    need = 8 * (engine + sum(g.canonical_bytes(tokens) for g in spec.groups))
    free = available_memory()
    if free is not None and need > free:
        raise UserError(
            f"layout {spec.name}: a round trip needs {need / 2**30:.1f} GiB of host memory, "
            f"{free / 2**30:.1f} GiB is available"
        )


def _seed(seed: int, name: str) -> int:
    # Stable per-layout seeds (crc32, not Python's salted hash) so a reported failure reproduces.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _device(torch, name: str):
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: {name!r} is not a torch device") from None
    if device.type == "cpu":
        return device
    # torch ships modules for device types it was not built for (torch.xpu, torch.mps on a CPU wheel):
    # only is_available() says whether tensors can be put there.
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "is_available"):
        raise UserError(f"--device: torch has no {device.type} support here")
    if not module.is_available():
        what = "CUDA/ROCm" if device.type == "cuda" else device.type
        raise UserError(f"--device: {name} requested but torch sees no {what} device")
    return device
