"""`kvport server status`: ask a running server for its figures and print them for a terminal (the same figures the
Grafana dashboard shows). Owns the formatting; must not change the server's state."""

from __future__ import annotations

import json
import os
from typing import Any

from kvport.errors import UserError
from kvport.server.server_metrics import quantile


def fetch_stats(address: str, token: str | None, timeout_ms: int = 10_000) -> dict[str, Any]:
    from kvport.server.client import Connection, ServerError, ServerUnavailable

    _check_listening(address)
    conn = Connection(address, token, "copy", timeout_ms, name=f"kvport server status pid {os.getpid()}")
    try:
        conn._connect()
        reply, _ = conn.call("stats")
    except ServerUnavailable as exc:
        raise UserError(f"no kvport server answers on {address} ({exc})") from None
    except ServerError as exc:
        raise UserError(f"kvport server {address}: {exc}") from None
    finally:
        conn.close()
    return reply["stats"]


def _check_listening(address: str) -> None:
    """Fail at once when nothing listens on an ipc address (instead of after the reply timeout); permission problems
    and the like are reported by the connection attempt itself."""
    from kvport.server.address import ipc_path, probe_ipc

    error = probe_ipc(address)
    if isinstance(error, FileNotFoundError):
        raise UserError(f"no kvport server at {address} (no socket {ipc_path(address)})")
    if isinstance(error, ConnectionRefusedError):
        raise UserError(f"no kvport server at {address} (nothing listens on {ipc_path(address)})")


def print_status(address: str | None, token: str | None, as_json: bool) -> int:
    from kvport.server.address import check_address
    from kvport.server.config import default_address

    address = check_address(address or default_address(), "--address")
    stats = fetch_stats(address, token or os.environ.get("KVPORT_SERVER_TOKEN"))
    if as_json:
        print(json.dumps(stats, indent=1, sort_keys=True, default=str))
        return 0
    for line in format_status(stats):
        print(line)
    return 0


def _total(details: dict, name: str) -> float:
    return sum(ns.get(name, 0) for ns in details.values())


def format_status(stats: dict[str, Any]) -> list[str]:
    c = stats["counters"]
    details = stats.get("namespaces_detail", {})
    hit, miss = c.get("lookup_chunks_hit", 0), c.get("lookup_chunks_miss", 0)
    l1 = stats["l1"]
    rate = f"{hit / (hit + miss):.1%} of {hit + miss:.0f} chunks looked up" if hit + miss else "-"
    lines = [
        f"server       {stats['address']} (pid {stats['pid']}, up {stats['uptime_s']:.0f} s)",
        f"clients      {stats['sessions']} connected, {stats['namespaces']} namespace(s)",
        f"hit rate     {rate}",
        f"tokens saved {c.get('tokens_loaded', 0):.0f} loaded into engines, {c.get('tokens_stored', 0):.0f} stored",
        f"L1           {l1['used']}/{l1['slots']} slots used, {l1['pinned']} pinned, {l1['slot_bytes']} bytes/slot"
        if l1["slots"]
        else f"L1           {l1['bytes']} bytes, slots sized when the first model opens",
    ]
    for tier in stats.get("tiers", []):
        used = tier.get("bytes")
        cap = tier.get("capacity_bytes")
        usage = f"{used / 2**30:.2f}/{cap / 2**30:.1f} GiB" if used is not None and cap else "usage unknown"
        lines.append(f"tier         {tier['describe']}: {usage}")
    server = stats.get("server_metrics", {})
    for source in (server, *details.values()):
        for key, value in sorted(source.items()):
            if key.startswith("gbps_") and value:
                lines.append(f"throughput   {key[5:]}: {value:.2f} GB/s (while moving)")
    evictions = server.get("evictions", 0) + _total(details, "evictions")
    failures = server.get("failures", 0) + _total(details, "failures")
    errors = sum(v for k, v in c.items() if k.startswith("errors_"))
    lines.append(f"evictions    {evictions:.0f}")
    lines.append(
        f"failures     {failures:.0f} chunks, {errors:.0f} refused requests, {c.get('leases_dropped', 0):.0f} "
        "slots freed from dead clients"
    )
    latency = stats.get("latency", {}).get("lookup")
    if latency and latency["count"]:
        p50, p99 = quantile(latency["buckets"], 0.5), quantile(latency["buckets"], 0.99)
        lines.append(
            f"lookup       {latency['count']} requests, mean {latency['sum'] / latency['count'] * 1e3:.3f} ms, "
            f"p50 <= {p50 * 1e3:g} ms, p99 <= {p99 * 1e3:g} ms (server time)"
        )
    return lines
