"""The shipped Grafana dashboard against a real Prometheus (Debian's 2.42) scraping a real `kvport server` on
loopback while clients use it: every panel's every query returns data. Also /health and `kvport server status`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from client_proc import CHUNK, NAMESPACE, config, tokens

from kvport.server import protocol as P
from kvport.server.spawn import ServerProcess
from kvport.testing.kv import nhd_kv

pytestmark = pytest.mark.servers
pytest.importorskip("zmq", reason="pyzmq is not installed (nox -s e2e)")

DASHBOARD = Path(__file__).resolve().parents[2] / "kvport" / "server" / "grafana_dashboard.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _traffic(address: str, stop: threading.Event) -> None:
    """Stores past L1's size (evictions, disk-tier writes), lookups that hit and miss, loads, a failed gather and a
    refused request, over and over until the test has its samples."""
    from kvport.server.remote import RemoteCache

    kv, desc = nhd_kv(num_blocks=64, seed=1)
    cache = RemoteCache(config(address), NAMESPACE)
    cache.bind(desc)
    round_ = 0
    while not stop.is_set():
        round_ += 1
        toks = tokens(round_, 8 * CHUNK)
        cache.store(toks, list(range(16)))
        cache.lookup(toks)
        cache.lookup(tokens(10**6 + round_, 2 * CHUNK))  # a miss
        cache.load(toks, list(range(20, 36)), 8 * CHUNK)
        keys = cache.chunk_keys(tokens(2 * 10**6 + round_, 2 * CHUNK))
        reply, _ = cache.conn.call("reserve", {"ns": NAMESPACE, "start": 0}, [P.keys_frame(keys)])
        cache.conn.call("commit", {"rid": reply["rid"], "ok": False})  # a gather that failed
        try:
            cache.conn.call("commit", {"rid": 999_999_999, "ok": True})  # refused: no such reservation
        except Exception:
            pass
        stop.wait(0.2)
    cache.close()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus (apt-get install prometheus)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path, spawn_client) -> None:
    metrics_port, prom_port = _free_port(), _free_port()
    address = f"ipc://{tmp_path}/s.sock"
    cache_cfg = {
        "l1_bytes": 64 * 4096,  # 64 slots: the traffic evicts
        "metrics_port": metrics_port,
        "tiers": [{"type": "local_disk", "path": str(tmp_path / "disk"), "bytes": "64MiB"}],
    }
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: kvport\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    with ServerProcess(tmp_path, {"address": address}, cache_cfg):
        status, body = _get(f"http://127.0.0.1:{metrics_port}/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        hung = spawn_client("pin-and-hang", address, 77, 4 * CHUNK)  # killed below: slots freed from a dead client
        prom = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("w"),
        )
        stop = threading.Event()
        traffic = threading.Thread(target=_traffic, args=(address, stop), daemon=True)
        try:
            traffic.start()
            time.sleep(3)
            hung.kill9()
            queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
            results = _wait_for_data(prom_port, queries, timeout=60)
        finally:
            stop.set()
            traffic.join(30)
            prom.terminate()
            prom.wait(30)
        empty = {q: r for q, r in results.items() if not r}
        assert not empty, f"queries without data: {list(empty)}\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        status = subprocess.run(
            [sys.executable, "-m", "kvport.cli.main", "server", "status", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert status.returncode == 0, status.stderr
    for label in ("hit rate", "tokens saved", "L1", "tier", "throughput", "evictions", "failures", "lookup"):
        assert any(line.startswith(label) for line in status.stdout.splitlines()), (label, status.stdout)


def _wait_for_data(port: int, queries: list[str], timeout: float) -> dict[str, list]:
    """Each query (Grafana's $__rate_interval as 15s) evaluated until all return at least one finite sample."""
    deadline = time.monotonic() + timeout
    while True:
        results = {}
        for query in queries:
            expr = query.replace("$__rate_interval", "15s")
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                code, body = _get(url)
            except OSError:
                code, body = 0, b""
            samples = json.loads(body)["data"]["result"] if code == 200 else []
            results[query] = [s for s in samples if s["value"][1] not in ("NaN", "+Inf", "-Inf")]
        if all(results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(1)
