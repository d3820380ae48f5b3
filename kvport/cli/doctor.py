"""`kvport doctor`: what this machine can do — platform, device, versions, native module, backends, engines, config.
Owns only gathering and printing the report; must not change any state or pick a backend for real work."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvport.cli import doctor_engines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--config", help="cache config YAML to report (default: $KVPORT_CONFIG, then KVPORT_* env)")
    parser.add_argument("--no-engine-imports", action="store_true", help="skip importing each engine's adapter")


def collect(config: str | None = None, engine_imports: bool = True) -> dict[str, Any]:
    from kvport import __version__
    from kvport.hal.native import native_status
    from kvport.hal.platform import detect_platform
    from kvport.hal.registry import BackendError, candidates, select_backend

    platform = detect_platform()
    # Asking the vendor runtime for its device count initialises the driver but creates no context.
    native = native_status(query_runtime=True)
    found = candidates(platform)
    try:
        selected, selection_error = select_backend(platform).name, None
    except BackendError as exc:
        selected, selection_error = None, str(exc)
    return {
        "kvport": __version__,
        "python": sys.version.split()[0],
        "platform": platform.to_dict(),
        "versions": {"torch": platform.torch_version, "triton": _version("triton")},
        "native": native.to_dict(),
        "backends": [
            {"name": c.name, "priority": c.priority, "available": c.verdict.ok, "reason": c.verdict.reason}
            for c in found
        ],
        "selected_backend": selected,
        "selection_error": selection_error,
        "engines": doctor_engines.engines(engine_imports),
        "cache_config": doctor_engines.cache_config(config),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def render(report: dict[str, Any]) -> str:
    platform, native = report["platform"], report["native"]
    device = platform["device_name"] or "none"
    lines = [
        f"kvport {report['kvport']} (python {report['python']})",
        f"platform   {platform['name']}  device: {device}"
        + (f" x{platform['device_count']}" if platform["device_count"] > 1 else ""),
        f"versions   torch {report['versions']['torch'] or 'not installed'}, "
        f"triton {report['versions']['triton'] or 'not installed'}",
        f"native     target={native['target']} archs={','.join(native['archs']) or '-'} "
        f"{'usable' if native['usable'] else 'loadable' if native['loadable'] else 'not loadable'}: {native['reason']}",
    ]
    if native.get("batched_copies") is not None:
        from kvport.hal.transfer.planner import CostModel, unbatched_floor_bytes

        floor = unbatched_floor_bytes(CostModel()) >> 10
        lines.append(
            "  copy engines: batched calls (cudaMemcpyBatchAsync)"
            if native["batched_copies"]
            else f"  copy engines: one call per region (no batched memcpy in this build); regions < {floor} KiB staged"
        )
    for name, reason in platform["reasons"].items():
        lines.append(f"  not {name}: {reason}")
    lines.append("backends (priority order):")
    for b in report["backends"]:
        mark = "yes" if b["available"] else "no "
        lines.append(f"  [{mark}] {b['name']:<7} {b['reason']}")
    if report["selected_backend"]:
        lines.append(f"selected   {report['selected_backend']}")
    else:
        lines.append(f"selected   none: {report['selection_error']}")
    lines.extend(doctor_engines.render(report))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect(args.config, not args.no_engine_imports)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["selected_backend"] and not report["cache_config"].get("error") else 1
