"""`kvport server`'s own figures: requests, errors, sessions, lookup results and latency, tokens moved, L1 and tier
usage; exported to Prometheus (kvport_server_*) beside the per-namespace kvport_cache_* series, and as one dict for
`kvport server status`. Owns the names and the collector; must not start servers or block the event loop."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

from kvport.store.metrics import BUCKETS

COUNTERS = {
    "requests": ("op",),
    "errors": ("reason",),
    "lookup_chunks": ("result",),  # hit / miss: chunks asked for in lookups (the hit rate)
    "tokens": ("op",),  # loaded (tokens saved: scattered into engines) / stored
    "sessions_dropped": ("cause",),  # died (process gone or silent), bye
    "leases_dropped": (),  # slots freed because their client died
}
HELP = {
    "requests": "requests handled, by op",
    "errors": "requests refused with an error reply, by reason",
    "lookup_chunks": "chunks asked for in lookups, by result (hit: found in L1 or a tier)",
    "tokens": "tokens moved through the server's L1, by op (loaded = prefill saved, stored)",
    "sessions_dropped": "client sessions ended, by cause",
    "leases_dropped": "L1 slots reserved or pinned by clients that died, freed without becoming visible",
}


class ServerStats:
    def __init__(self, gauges: Callable[[], dict[str, Any]]) -> None:
        """``gauges()`` returns the point-in-time figures (sessions, l1 usage, tier usage) when asked."""
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[str, ...]], float] = {}
        self._latency: dict[str, list] = {}  # op -> [bucket counts, sum, count]
        self._gauges = gauges
        self.started = time.time()

    def inc(self, name: str, value: float = 1, *labels: str) -> None:
        key = (name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, op: str, seconds: float) -> None:
        with self._lock:
            hist = self._latency.get(op)
            if hist is None:
                hist = self._latency[op] = [[0] * (len(BUCKETS) + 1), 0.0, 0]
            hist[0][bisect.bisect_left(BUCKETS, seconds)] += 1
            hist[1] += seconds
            hist[2] += 1

    def counter(self, name: str, *labels: str) -> float:
        with self._lock:
            return sum(v for (n, lab), v in self._counters.items() if n == name and lab[: len(labels)] == labels)

    def snapshot(self) -> dict[str, Any]:
        """Everything `kvport server status` prints (JSON-safe)."""
        with self._lock:
            counters = {f"{n}{''.join('_' + v for v in lab)}": v for (n, lab), v in self._counters.items()}
            latency = {op: {"buckets": list(h[0]), "sum": h[1], "count": h[2]} for op, h in self._latency.items()}
        return {"uptime_s": time.time() - self.started, "counters": counters, "latency": latency, **self._gauges()}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap_counters, snap_latency = self._copy()
        families: dict[str, Any] = {}
        for name, labels in COUNTERS.items():
            families[name] = CounterMetricFamily(f"kvport_server_{name}", HELP.get(name, name), labels=list(labels))
        for (name, values), value in snap_counters.items():
            families[name].add_metric(list(values), value)
        yield from families.values()
        hist = HistogramMetricFamily("kvport_server_request_seconds", "server time per request, by op", labels=["op"])
        for op, (counts, total) in snap_latency.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            hist.add_metric([op], buckets, total)
        yield hist
        gauges = self._gauges()
        yield GaugeMetricFamily("kvport_server_up", "1 while the server runs", value=1)
        yield GaugeMetricFamily("kvport_server_sessions", "connected client sessions", value=gauges["sessions"])
        yield GaugeMetricFamily("kvport_server_namespaces", "namespaces (model shards)", value=gauges["namespaces"])
        l1 = gauges["l1"]
        slot = GaugeMetricFamily("kvport_server_l1_slots", "L1 slots, by state", labels=["state"])
        slot.add_metric(["capacity"], l1["slots"])
        slot.add_metric(["used"], l1["used"])
        slot.add_metric(["pinned"], l1["pinned"])
        yield slot
        yield GaugeMetricFamily("kvport_server_l1_slot_bytes", "bytes per L1 slot", value=l1["slot_bytes"])
        used = GaugeMetricFamily("kvport_server_tier_bytes", "bytes stored, by tier", labels=["tier"])
        cap = GaugeMetricFamily("kvport_server_tier_capacity_bytes", "tier capacity, by tier", labels=["tier"])
        used.add_metric(["l1"], l1["used"] * l1["slot_bytes"])
        cap.add_metric(["l1"], l1["slots"] * l1["slot_bytes"])
        for tier in gauges["tiers"]:
            if "bytes" in tier:
                used.add_metric([tier["kind"]], tier["bytes"])
            if "capacity_bytes" in tier:
                cap.add_metric([tier["kind"]], tier["capacity_bytes"])
        yield used
        yield cap

    def describe(self):
        return []

    def _copy(self):
        with self._lock:
            return dict(self._counters), {op: (list(h[0]), h[1]) for op, h in self._latency.items()}


def quantile(buckets: list[int], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (what Prometheus' histogram_quantile bounds)."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bound, count in zip((*BUCKETS, float("inf")), buckets):
        seen += count
        if seen >= q * total:
            return bound
    return float("inf")
