"""`kvport cache`: list what the configured tiers hold per namespace, show hit/miss counters, clear namespaces.
Owns argument handling, confirmation and printing; the tiers answer through the Tier API (namespaces, clear)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvport.errors import UserError

# A namespace is chosen on the command line by this many leading hex digits of its digest, at least.
MIN_ID_DIGITS = 4
ID_DIGITS = 12  # shown in listings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    for name, text in (
        ("list", "chunks and bytes per namespace in every configured tier"),
        ("clear", "delete the chunks of one namespace (--namespace ID) or of all (--all), after confirmation"),
    ):
        action = sub.add_parser(name, help=text, description=text)
        action.add_argument("--config", help="cache config YAML (default: $KVPORT_CONFIG, then KVPORT_* variables)")
        action.add_argument("--l2-path", help="a local_disk tier directory (instead of, or besides, the config)")
        if name == "list":
            action.add_argument("--json", action="store_true", help="one JSON object (full namespace names)")
        else:
            which = action.add_mutually_exclusive_group(required=True)
            which.add_argument("--namespace", metavar="ID", help="an ID from `kvport cache list` or a full name")
            which.add_argument("--all", action="store_true", help="every chunk of every namespace")
            action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    stats = sub.add_parser("stats", help="hit/miss counters of running or finished engines")
    stats.add_argument("--stats-dir", help="the connector's stats_dir (scheduler.json, worker<rank>.json)")
    stats.add_argument("--metrics", metavar="URL", help="a kvport Prometheus endpoint, e.g. http://127.0.0.1:9400/")
    stats.add_argument("--json", action="store_true", help="one JSON object")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "cache_command", None)
    if action == "list":
        return _list(args)
    if action == "clear":
        return _clear(args)
    if action == "stats":
        return _stats(args)
    raise UserError("expected an action: list, clear or stats")


# ---- tiers ----------------------------------------------------------------------------------------------------
def _tiers(args: argparse.Namespace) -> list:
    from kvport.cache.config import load_config
    from kvport.store.tiers import build_tier

    overrides = {"l2_path": args.l2_path} if args.l2_path else None
    specs = load_config(args.config, overrides).tier_specs()
    if not specs:
        raise UserError("no tiers configured: pass --config FILE or --l2-path DIR, or set KVPORT_CONFIG")
    tiers = []
    for i, spec in enumerate(specs):
        if spec.get("type") == "local_disk" and not Path(spec["path"]).expanduser().is_dir():
            raise UserError(f"tiers[{i}] (local_disk): {spec['path']} is not a directory")
        tiers.append(build_tier(spec, f"cache config: tiers[{i}] ({spec.get('type')})"))
    return tiers


def _usage(tiers: list) -> list[tuple[Any, list | None]]:
    return [(tier, tier.namespaces()) for tier in tiers]


def _list(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    try:
        listing = _usage(tiers)
    finally:
        for tier in tiers:
            tier.close()
    if args.json:
        out = [
            {
                "tier": tier.describe(),
                "namespaces": None
                if usage is None
                else [{"id": u.digest.hex(), "name": u.name, "chunks": u.chunks, "bytes": u.bytes} for u in usage],
            }
            for tier, usage in listing
        ]
        print(json.dumps(out, indent=2))
        return 0
    for tier, usage in listing:
        print(tier.describe())
        if usage is None:
            print("  (this tier cannot list its namespaces)")
            continue
        if not usage:
            print("  (empty)")
            continue
        print(f"  {'ID':<{ID_DIGITS}}  {'chunks':>8}  {'bytes':>10}  namespace")
        for u in usage:
            print(f"  {u.digest.hex()[:ID_DIGITS]:<{ID_DIGITS}}  {u.chunks:>8}  {_size(u.bytes):>10}  {describe(u)}")
    return 0


def describe(usage: Any) -> str:
    """A namespace in one line: the fields of a shard namespace (kvport.engines.key_namespace) that tell shards apart,
    or the name as it is. Namespaces of kvport versions before that format (an ``engine`` field) are marked: no engine
    reads their chunks any more; ``kvport cache clear`` reclaims them."""
    if not any(usage.digest):
        return "(stored before namespaces were recorded)"
    if not usage.name:
        return "(name not recorded)"
    try:
        fields = json.loads(usage.name)
    except ValueError:
        return usage.name
    if not isinstance(fields, dict) or not {"format", "engine"} & fields.keys():
        return usage.name
    ident = f"name={fields['name']}" if "name" in fields else f"model={fields.get('model')}"
    if fields.get("revision"):
        ident += f"@{fields['revision']}"
    parts = [ident] if "format" in fields else ["(earlier key format)", ident]
    if fields.get("weights"):
        parts.append(f"weights={str(fields['weights'])[:20]}")
    for key in ("kv_dtype", "layers"):
        if fields.get(key):
            parts.append(f"{key}={fields[key]}")
    for key in ("tp", "pp"):
        if isinstance(fields.get(key), list) and len(fields[key]) == 2:
            parts.append(f"{key}={fields[key][0]}/{fields[key][1]}")
    if fields.get("layout"):
        parts.append(f"layout={str(fields['layout'])[:8]}")
    return " ".join(parts)


def _clear(args: argparse.Namespace) -> int:
    tiers = _tiers(args)
    try:
        listing = _usage(tiers)
        if args.all:
            digests = None
            chosen = [u for _, usage in listing for u in usage or ()]
        else:
            chosen = _choose(args.namespace, [u for _, usage in listing for u in usage or ()])
            digests = sorted({u.digest for u in chosen})
        chunks, nbytes = sum(u.chunks for u in chosen), sum(u.bytes for u in chosen)
        what = "every namespace" if args.all else describe(chosen[0])
        blind = [tier.describe() for tier, usage in listing if usage is None]
        if blind:
            print(f"cannot list (and may not clear): {', '.join(blind)}")
        if not args.yes:
            if not sys.stdin.isatty():
                raise UserError("refusing to delete without confirmation: pass --yes")
            answer = input(f"delete {chunks} chunks ({_size(nbytes)}) of {what}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        for tier in tiers:
            deleted = tier.clear(digests)
            status = "cannot clear" if deleted is None else f"deleted {deleted} chunks"
            print(f"{tier.describe()}: {status}")
    finally:
        for tier in tiers:
            tier.close()
    return 0


def _choose(wanted: str, usages: list) -> list:
    """The namespace(s) an ID prefix or a full name names (the same namespace may be in several tiers)."""
    by_name = [u for u in usages if u.name and u.name == wanted]
    if by_name:
        return by_name
    text = wanted.lower()
    if len(text) < MIN_ID_DIGITS or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"--namespace {wanted!r}: give an ID from `kvport cache list` (hex, {MIN_ID_DIGITS}+ digits)")
    found = [u for u in usages if u.digest.hex().startswith(text)]
    ids = {u.digest for u in found}
    if not ids:
        raise UserError(f"--namespace {wanted}: no such namespace in the configured tiers (see `kvport cache list`)")
    if len(ids) > 1:
        raise UserError(f"--namespace {wanted}: matches {len(ids)} namespaces, give more digits")
    return found


# ---- counters -------------------------------------------------------------------------------------------------
def _stats(args: argparse.Namespace) -> int:
    if bool(args.stats_dir) == bool(args.metrics):
        raise UserError("give one of --stats-dir DIR or --metrics URL")
    report = _from_stats_dir(Path(args.stats_dir)) if args.stats_dir else _from_metrics(args.metrics)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for source, counters in report.items():
        print(source)
        for name, value in counters.items():
            print(f"  {name:<40} {value:g}" if isinstance(value, (int, float)) else f"  {name:<40} {value}")
    return 0


COUNTER_PREFIXES = ("hits", "misses", "failures", "tokens_", "evictions", "skipped")


def _from_stats_dir(directory: Path) -> dict[str, dict[str, Any]]:
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        raise UserError(f"--stats-dir {directory}: no scheduler.json or worker<rank>.json there")
    report: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a kvport stats file ({exc})") from None
        counters: dict[str, Any] = {}
        if data.get("role") == "scheduler":
            for key in ("requests", "hit_requests", "prompt_tokens", "hit_tokens"):
                counters[key] = data.get(key, 0)
            if data.get("prompt_tokens"):
                counters["hit_token_share"] = round(data.get("hit_tokens", 0) / data["prompt_tokens"], 4)
        for key, value in (data.get("connector") or {}).items():
            counters[f"connector.{key}"] = value
        for key, value in sorted((data.get("cache") or {}).items()):
            if key.startswith(COUNTER_PREFIXES) and isinstance(value, (int, float)):
                counters[f"cache.{key}"] = value
        report[path.stem] = counters
    return report


def _from_metrics(url: str) -> dict[str, dict[str, Any]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except (OSError, ValueError) as exc:
        raise UserError(f"--metrics {url}: cannot read ({exc})") from None
    report: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("kvport_cache_") or family.type != "counter":
            continue
        name = family.name.removeprefix("kvport_cache_")
        if not name.startswith(COUNTER_PREFIXES):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = dict(sample.labels)
            cache = labels.pop("cache", "")
            suffix = "_".join(labels[k] for k in sorted(labels))
            key = f"{name}_{suffix}" if suffix else name
            report.setdefault(cache, {})[key] = report.get(cache, {}).get(key, 0) + sample.value
    if not report:
        raise UserError(f"--metrics {url}: no kvport_cache_* counters there")
    return report


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
