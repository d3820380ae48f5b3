"""`kvport cache list|clear|stats` on a real disk tier written by real cache engines, and on the counters a real
connector worker side and a real Prometheus exposition produce."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from kvport.cache import CacheEngine, load_config
from kvport.cli.main import main
from kvport.engines.key_namespace import namespace_for
from kvport.engines.vllm_plan import TransferSpec
from kvport.engines.vllm_worker import WorkerSide
from kvport.hal.backends.torch_ref import TorchBackend
from kvport.store.envelope import namespace_digest
from kvport.testing.kv import nhd_kv

C = 32
NS_A = namespace_for("/models/a", None, "bfloat16", 0, 1, weights="content:aa", layout="f" * 32, layers="0-1")
NS_B = namespace_for("/models/b", "v2", "bfloat16", 1, 2, weights="stat:bb", layout="e" * 32, layers="0-1")


def _engine(l2, namespace):
    engine = CacheEngine(load_config(overrides={"chunk_tokens": C, "l1_bytes": "1MiB", "l2_path": str(l2)}), namespace)
    engine.bind(nhd_kv(seed=3)[1], TorchBackend())
    return engine


@pytest.fixture
def l2(tmp_path):
    root = tmp_path / "l2"
    for namespace, chunks in ((NS_A, 3), (NS_B, 2)):
        with _engine(root, namespace) as engine:
            engine.store(list(range(C * chunks)), list(range(2 * chunks)))
    return root


def _listing(capsys, l2) -> dict:
    assert main(["cache", "list", "--l2-path", str(l2), "--json"]) == 0
    [tier] = json.loads(capsys.readouterr().out)
    return {ns["name"]: ns for ns in tier["namespaces"]}


def test_list_shows_chunks_and_bytes_per_namespace(capsys, l2):
    listed = _listing(capsys, l2)
    assert set(listed) == {NS_A, NS_B}
    assert listed[NS_A]["chunks"] == 3 and listed[NS_B]["chunks"] == 2
    assert listed[NS_A]["bytes"] == 3 * listed[NS_B]["bytes"] // 2
    assert listed[NS_A]["id"] == namespace_digest(NS_A).hex()
    assert main(["cache", "list", "--l2-path", str(l2)]) == 0
    text = capsys.readouterr().out
    assert "  model=/models/b@v2 weights=stat:bb kv_dtype=bfloat16 layers=0-1 tp=1/2 pp=0/1" in text
    assert namespace_digest(NS_A).hex()[:12] in text


def test_clear_one_namespace_then_all(capsys, l2):
    ident = namespace_digest(NS_A).hex()[:6]
    assert main(["cache", "clear", "--l2-path", str(l2), "--namespace", ident, "--yes"]) == 0
    assert "deleted 3 chunks" in capsys.readouterr().out
    assert set(_listing(capsys, l2)) == {NS_B}
    with _engine(l2, NS_B) as engine:
        assert engine.lookup(list(range(C * 2))) == 2 * C  # the other namespace is untouched
    assert main(["cache", "clear", "--l2-path", str(l2), "--all", "--yes"]) == 0
    assert "deleted 2 chunks" in capsys.readouterr().out
    assert _listing(capsys, l2) == {}


def test_clear_asks_and_refuses_without_a_terminal(l2, bounded_kvport, capsys):
    run = bounded_kvport(["cache", "clear", "--l2-path", str(l2), "--all"])
    assert (
        run.returncode == 2
        and run.stderr.strip() == "kvport cache: refusing to delete without confirmation: pass --yes"
    )
    assert len(_listing(capsys, l2)) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--namespace", "zz"], "give an ID from `kvport cache list`"),
        (["--namespace", "0000000000"], "no such namespace"),
    ],
)
def test_clear_names_a_bad_namespace_in_one_line(l2, capsys, args, message):
    assert main(["cache", "clear", "--l2-path", str(l2), *args, "--yes"]) == 2
    assert message in capsys.readouterr().err


def test_list_without_tiers_or_with_a_missing_directory_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KVPORT_CONFIG", raising=False)
    monkeypatch.delenv("KVPORT_L2_PATH", raising=False)
    assert main(["cache", "list"]) == 2
    assert "no tiers configured" in capsys.readouterr().err
    assert main(["cache", "list", "--l2-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_stats_from_a_connector_stats_dir(tmp_path, capsys):
    """The worker file as the connector writes it (WorkerSide.stats()), after a store and a load with one miss."""
    kv, desc = nhd_kv(seed=4)
    with _engine(tmp_path / "l2", NS_A) as engine:
        worker = WorkerSide(engine, 16)
        tokens = list(range(C * 3))
        worker.store([TransferSpec("r1", tokens, [list(range(6))], 2 * C)])
        worker.load([TransferSpec("r2", tokens, [list(range(6, 12))], 3 * C)])
        stats = {"role": "worker", "rank": 0} | worker.stats() | {"namespace": engine.namespace}
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "worker0.json").write_text(json.dumps(stats, default=str))
    assert main(["cache", "stats", "--stats-dir", str(tmp_path / "stats"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["worker0"]
    assert report["connector.tokens_stored"] == 2 * C
    assert report["connector.tokens_loaded"] == 2 * C and report["connector.load_failures"] == 1
    assert report["cache.hits"] >= 2 and report["cache.misses"] >= 1


def test_stats_from_a_prometheus_endpoint(tmp_path, capsys):
    from prometheus_client import generate_latest

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = generate_latest()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    namespace = namespace_for("/models/metrics-test", None, layers="0-1")  # no other test's engine shares it
    with _engine(tmp_path / "l2", namespace) as engine:
        engine.store(list(range(C * 2)), list(range(4)))
        assert engine.lookup(list(range(C * 3))) == 2 * C  # 2 hits and a miss
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
            assert main(["cache", "stats", "--metrics", url, "--json"]) == 0
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    report = json.loads(capsys.readouterr().out)
    label = engine.metrics.label
    assert report[label]["tokens_stored"] == 2 * C
    assert report[label]["misses_lookup_all"] >= 1


def test_describe_marks_namespaces_of_the_earlier_key_format():
    """Chunks stored before the shared key format (an ``engine`` field) stay listed, marked, so they can be cleared."""
    from kvport.cli.cache import describe
    from kvport.store.tiers.base import NamespaceUsage

    old = json.dumps({"engine": "vllm", "model": "/models/a", "revision": None, "kv_dtype": "bfloat16", "tp": [0, 1]})
    want = "(earlier key format) model=/models/a kv_dtype=bfloat16 tp=0/1"
    assert describe(NamespaceUsage(b"\x01" * 16, old)) == want
    assert describe(NamespaceUsage(b"\x01" * 16, NS_A)).startswith("model=/models/a weights=content:aa")
    assert describe(NamespaceUsage(b"\x01" * 16, "plain-name")) == "plain-name"
