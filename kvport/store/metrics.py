"""Cache metrics: thread-safe counters and latency histograms per engine, exported through prometheus-client.
Owns metric names and the Prometheus collector; must not start servers on import or block the data path."""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from kvport.errors import UserError

# Latency buckets (seconds) spanning a ~2 us in-memory lookup to a multi-second disk stall.
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)

# name -> help text. Counters carry labels; stats() flattens them as name_<label values>.
COUNTERS = {
    "hits": "chunks found, by tier",
    "misses": "chunks not found, by tier",
    "bytes": "bytes moved, by tier and op (read/write)",
    "seconds": "seconds spent moving those bytes, by tier and op (bytes/seconds = GB/s)",
    "evictions": "chunks evicted to stay within capacity, by tier",
    "failures": "chunks rejected or lost: corrupt, truncated, wrong fingerprint, I/O errors; by tier and reason",
    "skipped": "chunks not stored: L1 exhausted, queue full, already stored; by reason",
    "tokens_loaded": "tokens scattered into engine memory",
    "tokens_stored": "tokens gathered out of engine memory into the cache",
}
HISTOGRAMS = {"latency": "seconds per operation, by op"}

_live: weakref.WeakSet[CacheMetrics] = weakref.WeakSet()
_registered = False
_register_lock = threading.Lock()


class CacheMetrics:
    """Counters and histograms of one cache engine; ``label`` names it in Prometheus (a short namespace id)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hists: dict[tuple[str, tuple[tuple[str, str], ...]], list] = {}
        _live.add(self)
        _ensure_registered()

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            hist = self._hists.get(key)
            if hist is None:
                hist = self._hists[key] = [[0] * (len(BUCKETS) + 1), 0.0, 0]
            hist[0][bisect.bisect_left(BUCKETS, seconds)] += 1
            hist[1] += seconds
            hist[2] += 1

    def transfer(self, tier: str, op: str, nbytes: int, seconds: float) -> None:
        self.inc("bytes", nbytes, tier=tier, op=op)
        self.inc("seconds", seconds, tier=tier, op=op)

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a counter over every label set that matches ``labels``."""
        with self._lock:
            return sum(v for (n, lab), v in self._counters.items() if n == name and set(labels.items()) <= set(lab))

    def _copy(self) -> tuple[dict, dict]:
        """Counters and histograms copied under the lock, so a reader never sees half of an update."""
        with self._lock:
            return dict(self._counters), {k: (list(v[0]), v[1], v[2]) for k, v in self._hists.items()}

    def snapshot(self) -> dict[str, Any]:
        """Flat dict: totals per counter name, per label set (``hits_l1``, ``bytes_l2_read``), GB/s per tier/op."""
        counters, hists = self._copy()
        out: dict[str, Any] = {name: 0 for name in COUNTERS}
        for (name, labels), value in counters.items():
            out[name] = out.get(name, 0) + value
            if labels:
                flat = _flat(name, labels)
                out[flat] = out.get(flat, 0) + value
        for key in [k for k in out if k.startswith("bytes_")]:
            seconds = out.get("seconds_" + key[len("bytes_") :], 0)
            out["gbps_" + key[len("bytes_") :]] = out[key] / seconds / 1e9 if seconds > 0 else 0.0
        for (name, labels), (_, total, count) in hists.items():
            flat = _flat(name, labels)
            out[f"{flat}_count"] = count
            out[f"{flat}_mean_s"] = total / count if count else 0.0
        return out

    def _families(self) -> Iterator[tuple[str, str, dict[str, str], Any]]:
        counters, hists = self._copy()
        for (name, labels), value in counters.items():
            yield "counter", name, dict(labels), value
        for (name, labels), value in hists.items():
            yield "histogram", name, dict(labels), value


# Flattened stats() names put labels in this order: hits_load_l2, bytes_read_l1, failures_l2_corrupt.
_LABEL_ORDER = {"op": 0, "tier": 1, "reason": 2}


def _flat(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    ordered = sorted(labels, key=lambda kv: (_LABEL_ORDER.get(kv[0], 9), kv[0]))
    return f"{name}_" + "_".join(v for _, v in ordered)


class _Collector:
    """Exposes every live engine's metrics on prometheus-client's default registry, labelled by namespace.
    Engines of one namespace in one process (vLLM's scheduler and worker sides) are summed into one series."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        counters: dict[tuple[str, tuple[str, ...], tuple[str, ...]], float] = {}
        hists: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list] = {}
        for metrics in list(_live):
            for kind, name, labels, value in metrics._families():
                names = ("cache", *sorted(labels))
                key = (name, names, (metrics.label, *(labels[k] for k in sorted(labels))))
                if kind == "counter":
                    counters[key] = counters.get(key, 0) + value
                else:
                    counts, total, _ = value
                    acc = hists.setdefault(key, [[0] * len(counts), 0.0])
                    acc[0] = [a + b for a, b in zip(acc[0], counts)]
                    acc[1] += total
        families: dict[tuple[str, tuple[str, ...]], Any] = {}
        for (name, names, values), value in counters.items():
            fam = families.get((name, names))
            if fam is None:
                fam = families[(name, names)] = CounterMetricFamily(
                    f"kvport_cache_{name}", COUNTERS[name], labels=list(names)
                )
            fam.add_metric(list(values), value)
        for (name, names, values), (counts, total) in hists.items():
            fam = families.get(("hist", name, names))
            if fam is None:
                fam = families[("hist", name, names)] = HistogramMetricFamily(
                    f"kvport_cache_{name}_seconds", HISTOGRAMS[name], labels=list(names)
                )
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts):
                cumulative += count
                buckets.append((bound, cumulative))
            fam.add_metric(list(values), buckets, total)
        yield from families.values()

    def describe(self):
        return []  # dynamic families; an empty describe keeps registration free of a collect() call


def _ensure_registered() -> None:
    global _registered
    with _register_lock:
        if _registered:
            return
        from prometheus_client import REGISTRY

        REGISTRY.register(_Collector())
        _registered = True


_served_ports: set[int] = set()


def serve_metrics(port: int, addr: str = "127.0.0.1", health: Callable[[], tuple[bool, dict]] | None = None) -> None:
    """Serve every engine's metrics over HTTP (``/metrics``) on ``addr`` (loopback unless the operator widens it);
    once per port per process. Called by host processes (engine adapters, servers), never by the cache itself.
    With ``health``, ``/health`` answers its dict as JSON, 200 when it says ok and 503 otherwise."""
    from prometheus_client import start_http_server

    with _register_lock:
        if port in _served_ports:
            return
        try:
            if health is None:
                start_http_server(port, addr=addr)
            else:
                _serve_with_health(port, addr, health)
        except OSError as exc:  # port taken or not ours to bind: a config problem, not a crash
            raise UserError(f"cache config: metrics_port={port}: cannot serve metrics ({exc.strerror})") from None
        _served_ports.add(port)


def _serve_with_health(port: int, addr: str, health: Callable[[], tuple[bool, dict]]) -> None:
    import json
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    metrics_app = make_wsgi_app()

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/health":
            return metrics_app(environ, start_response)
        ok, body = health()
        data = json.dumps(body, default=str).encode()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # one line per scrape would flood the server's log
            return None

    httpd = make_server(addr, port, app, ThreadingWSGIServer, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="kvport-metrics", daemon=True).start()
