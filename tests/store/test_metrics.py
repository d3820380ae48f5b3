"""Tests for kvport.store.metrics: flattened stats names, GB/s from bytes and seconds, histogram exposition."""

from __future__ import annotations

import socket
import threading

import pytest
from prometheus_client import generate_latest

from kvport.errors import UserError
from kvport.store.metrics import CacheMetrics, serve_metrics


def test_snapshot_flattens_labels_and_derives_gbps():
    m = CacheMetrics("metrics-unit")
    m.inc("hits", 3, op="load", tier="l2")
    m.inc("failures", tier="l2", reason="corrupt")
    m.transfer("l2", "read", 2_000_000_000, 0.5)
    snap = m.snapshot()
    assert snap["hits"] == 3 and snap["hits_load_l2"] == 3
    assert snap["failures_l2_corrupt"] == 1
    assert snap["gbps_read_l2"] == 4.0
    assert snap["misses"] == 0  # every counter name present even when zero


def test_counters_are_thread_safe():
    m = CacheMetrics("metrics-threads")

    def work():
        for _ in range(5000):
            m.inc("hits", op="lookup", tier="l1")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.counter("hits", tier="l1") == 20000


def test_histogram_buckets_are_cumulative_in_exposition():
    m = CacheMetrics("metrics-hist")
    for seconds in (5e-6, 3e-5, 3e-5, 2.0):
        m.observe("latency", seconds, op="lookup")
    text = generate_latest().decode()
    prefix = 'kvport_cache_latency_seconds_bucket{cache="metrics-hist",le="%s",op="lookup"}'
    assert (prefix % "1e-05") + " 1.0" in text
    assert (prefix % "5e-05") + " 3.0" in text
    assert (prefix % "+Inf") + " 4.0" in text
    assert 'kvport_cache_latency_seconds_count{cache="metrics-hist",op="lookup"} 4.0' in text


def test_engines_of_one_namespace_are_summed_into_one_series():
    a, b = CacheMetrics("metrics-same"), CacheMetrics("metrics-same")
    a.inc("hits", 2, op="lookup", tier="l2")
    b.inc("hits", 3, op="lookup", tier="l2")
    a.observe("latency", 1e-3, op="lookup")
    b.observe("latency", 1e-3, op="lookup")
    text = generate_latest().decode()
    assert text.count('kvport_cache_hits_total{cache="metrics-same",op="lookup",tier="l2"}') == 1
    assert 'kvport_cache_hits_total{cache="metrics-same",op="lookup",tier="l2"} 5.0' in text
    assert 'kvport_cache_latency_seconds_count{cache="metrics-same",op="lookup"} 2.0' in text


def test_metrics_port_in_use_is_a_user_error():
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(UserError, match=f"metrics_port={port}: cannot serve metrics"):
            serve_metrics(port)
