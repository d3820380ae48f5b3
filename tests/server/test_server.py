"""A real `kvport server` process with real client processes: sharing across processes, bytes, client death (kill -9)
mid-store and holding pins, bad messages, a flooding client, a server that is down, dies and comes back."""

from __future__ import annotations

import time

import pytest
from client_proc import CHUNK, NAMESPACE, config, tokens

from kvport.errors import UserError
from kvport.server.spawn import ServerProcess
from kvport.testing.kv import blocks_equal, nhd_kv

pytestmark = pytest.mark.servers
pytest.importorskip("zmq", reason="pyzmq is not installed (nox -s e2e)")

L1_BYTES = 4 << 20  # 1024 slots of one 4 KiB test chunk


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(root, {"address": f"ipc://{root}/s.sock"}, {"l1_bytes": L1_BYTES}) as srv:
        yield srv


def _cache(address: str, seed: int | None = None, **extra):
    from kvport.server.remote import RemoteCache

    kv, desc = nhd_kv(num_blocks=64, seed=seed)
    cache = RemoteCache(config(address, **extra), NAMESPACE)
    cache.bind(desc)
    return cache, kv


def _wait_for(predicate, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chunk_stored_by_one_process_is_a_hit_in_another_and_loads_byte_exact(server, spawn_client) -> None:
    count = 10 * CHUNK
    lookup_only = _scheduler(server.address)
    assert lookup_only.lookup(tokens(1, count)) == 0
    writer = spawn_client("store", server.address, 1, count)
    assert writer.line == f"stored {count}" and writer.wait() == 0
    assert lookup_only.lookup(tokens(1, count)) == count  # a process that never mapped the shared L1
    reader, kv = _cache(server.address)
    ids = list(range(40, 60))
    assert reader.load(tokens(1, count), ids, count) == count
    source, _ = nhd_kv(num_blocks=64, seed=1)
    assert blocks_equal(source, kv, list(range(count // 16)), ids)
    assert not blocks_equal(source, kv, [count // 16], [ids[-1] + 1])  # untouched beyond the loaded blocks
    stats = server.stats()
    assert stats["counters"]["tokens_loaded"] >= count and stats["l1"]["pinned"] == 0
    reader.close()
    lookup_only.close()


def _scheduler(address: str):
    from kvport.server.remote import RemoteCache

    return RemoteCache(config(address), NAMESPACE)


def test_client_killed_mid_store_leaks_nothing_and_shows_no_partial_chunk(server, spawn_client) -> None:
    count = 8 * CHUNK
    before = server.stats()
    hung = spawn_client("reserve-and-hang", server.address, 2, count)
    assert hung.line == "reserved 8"
    assert server.stats()["l1"]["pinned"] == before["l1"]["pinned"] + 8
    probe = _scheduler(server.address)
    assert probe.lookup(tokens(2, count)) == 0  # reserved and half written: invisible
    hung.kill9()
    _wait_for(lambda: server.stats()["l1"]["pinned"] == before["l1"]["pinned"], what="the dead client's slots")
    after = server.stats()
    assert after["counters"]["leases_dropped"] >= before["counters"].get("leases_dropped", 0) + 8
    assert probe.lookup(tokens(2, count)) == 0
    # The same chunks can be stored and loaded whole by someone else; nothing of the garbage survives.
    writer = spawn_client("store", server.address, 2, count)
    assert writer.line == f"stored {count}"
    reader, kv = _cache(server.address)
    assert reader.load(tokens(2, count), list(range(16)), count) == count
    assert blocks_equal(nhd_kv(num_blocks=64, seed=2)[0], kv, list(range(16)), list(range(16)))
    reader.close()
    probe.close()


def test_client_killed_holding_pins_releases_them(server, spawn_client) -> None:
    count = 6 * CHUNK
    before = server.stats()["l1"]["pinned"]
    hung = spawn_client("pin-and-hang", server.address, 3, count)
    assert hung.line == "pinned 6"
    assert server.stats()["l1"]["pinned"] == before + 6
    hung.kill9()
    _wait_for(lambda: server.stats()["l1"]["pinned"] == before, what="the dead client's pins")
    probe = _scheduler(server.address)
    assert probe.lookup(tokens(3, count)) == count  # committed chunks stay; only the pins went
    probe.close()


def test_bad_messages_get_error_replies_and_the_server_keeps_serving(server) -> None:
    import json

    import zmq

    from kvport.server import protocol as P

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)

    def ask(*frames) -> dict:
        sock.send_multipart(list(frames))
        assert sock.poll(5000), f"no reply to {frames[:1]!r}"
        return json.loads(sock.recv_multipart()[0])

    hello = {"v": 1, "op": "hello", "id": 1, "transport": "copy", "pid": 1}
    cases = {
        "malformed": [b"\xff\xfe not json"],
        "unknown_op": [json.dumps({"v": 1, "op": "format_disk", "id": 2}).encode()],
        "version": [json.dumps({"v": 99, "op": "ping", "id": 3}).encode()],
        "no_session": [json.dumps({"v": 1, "op": "ping", "id": 4}).encode()],
        "oversized": [b"{" + b" " * (P.MAX_HEADER_BYTES + 1) + b"}"],
    }
    for reason, frames in cases.items():
        reply = ask(*frames)
        assert reply["reason"] == reason and reply["error"], reply
    assert "error" not in ask(json.dumps(hello).encode())
    session_cases = {
        "malformed": [json.dumps({"v": 1, "op": "lookup", "id": 5}).encode()],  # no ns
        "bad_keys": [json.dumps({"v": 1, "op": "lookup", "id": 6, "ns": "x"}).encode(), b"abc"],
        "too_many_keys": [json.dumps({"v": 1, "op": "lookup", "id": 7, "ns": "x"}).encode(), b"\0" * 32 * 9000],
        "unknown_reservation": [json.dumps({"v": 1, "op": "commit", "id": 8, "rid": 12345, "ok": True}).encode()],
        "not_open": [json.dumps({"v": 1, "op": "pin", "id": 9, "ns": "never-opened"}).encode(), b"\0" * 32],
    }
    for reason, frames in session_cases.items():
        reply = ask(*frames)
        assert reply["reason"] == reason, reply
    many = ask(json.dumps({"v": 1, "op": "ping", "id": 10}).encode(), *[b""] * (P.MAX_FRAMES + 5))
    assert many["reason"] == "oversized"
    # A frame past the server's hard limit (max_message_bytes) makes libzmq drop this peer: no reply, no crash.
    sock.send_multipart([json.dumps({"v": 1, "op": "ping", "id": 11}).encode(), b"\0" * (257 << 20)])
    assert not sock.poll(1000)
    sock.close()
    ctx.term()
    probe = _scheduler(server.address)
    assert probe.lookup(tokens(99, 4 * CHUNK)) == 0  # still answering
    probe.close()
    assert server.proc.poll() is None


def test_a_flooding_client_does_not_stall_the_others(server, spawn_client) -> None:
    flood = spawn_client("flood", server.address, 4, 50_000)
    assert flood.line.startswith("flooded")
    other = _scheduler(server.address)
    latencies = []
    for _ in range(200):
        start = time.perf_counter()
        other.lookup(tokens(4, 16 * CHUNK))
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    # Fair queuing across clients: the flood's backlog (thousands of lookups) is not in front of us.
    assert latencies[int(0.99 * len(latencies))] < 0.1, latencies[-5:]
    assert other.stats()["server"]["disconnects"] == 0
    other.close()


def test_one_client_cannot_hold_every_slot(server, spawn_client) -> None:
    # A client may hold at most half of L1 (client_share 0.5) reserved or pinned at once.
    greedy, _ = _cache(server.address, seed=5)
    total = server.stats()["l1"]["slots"]
    from kvport.server import protocol as P

    keys = greedy.chunk_keys(tokens(5, 1024 * CHUNK))
    reply, _ = greedy.conn.call("reserve", {"ns": NAMESPACE, "start": 0}, [P.keys_frame(keys)])
    assert len(reply["idx"]) == total // 2
    other = spawn_client("store", server.address, 6, 8 * CHUNK)
    assert other.line == f"stored {8 * CHUNK}"
    greedy.conn.call("commit", {"rid": reply["rid"], "ok": False})
    greedy.close()


def test_namespace_with_another_chunk_shape_is_refused(server) -> None:
    from kvport.server.remote import RemoteCache

    _, wrong = nhd_kv(num_blocks=64, heads=4)  # twice the bytes per chunk under the same namespace
    cache = RemoteCache(config(server.address), NAMESPACE)
    with pytest.raises(UserError, match="is served with chunks of"):
        cache.bind(wrong)
    cache.close()


def test_copy_transport_round_trips_bytes(server) -> None:
    writer, _ = _cache(server.address, seed=7, server_transport="copy")
    count = 4 * CHUNK
    assert writer.store(tokens(7, count), list(range(8))) == count
    reader, kv = _cache(server.address, server_transport="copy")
    assert reader.load(tokens(7, count), list(range(20, 28)), count) == count
    assert blocks_equal(nhd_kv(num_blocks=64, seed=7)[0], kv, list(range(8)), list(range(20, 28)))
    assert reader.stats()["server"]["staged"] is True
    writer.close()
    reader.close()


def test_server_down_at_start_then_up_then_killed_then_back(tmp_path) -> None:
    address = f"ipc://{tmp_path}/late.sock"
    cache, kv = _cache(address, seed=8, server_timeout_ms=300)
    count = 4 * CHUNK
    start = time.perf_counter()
    assert cache.lookup(tokens(8, count)) == 0 and cache.store(tokens(8, count), list(range(8))) == 0
    assert time.perf_counter() - start < 0.05, "a down server must cost nothing per request"
    assert cache.stats()["failures_server_unavailable"] >= 2
    srv = ServerProcess(tmp_path, {"address": address}, {"l1_bytes": L1_BYTES}).start()
    try:
        _wait_for(lambda: cache.conn.up, what="the client to connect")
        assert cache.store(tokens(8, count), list(range(8))) == count
        assert cache.lookup(tokens(8, count)) == count
        srv.kill()
        # The first request after the crash waits for its reply at most server_timeout_ms, then every request is
        # a miss at once until the server is back.
        assert cache.lookup(tokens(8, count)) == 0
        start = time.perf_counter()
        assert cache.lookup(tokens(8, count)) == 0
        assert time.perf_counter() - start < 0.05
        srv = ServerProcess(tmp_path, {"address": address}, {"l1_bytes": L1_BYTES}).start()
        _wait_for(lambda: cache.conn.up, what="the client to reconnect")
        assert cache.lookup(tokens(8, count)) == 0  # a new server starts empty (no tier configured)
        assert cache.store(tokens(8, count), list(range(8))) == count  # into the new server's shared memory
        ids = list(range(30, 38))
        assert cache.load(tokens(8, count), ids, count) == count
        assert blocks_equal(nhd_kv(num_blocks=64, seed=8)[0], kv, list(range(8)), ids)
        assert cache.stats()["server"]["connects"] == 2 and cache.stats()["server"]["disconnects"] == 1
    finally:
        cache.close()
        srv.stop()


def test_token_and_socket_permissions_keep_others_out(tmp_path) -> None:
    import os
    import subprocess

    from kvport.server.remote import RemoteCache

    address = f"ipc://{tmp_path}/tok/s.sock"
    with ServerProcess(tmp_path, {"address": address, "token": "s3cret"}, {"l1_bytes": L1_BYTES}) as srv:
        with pytest.raises(UserError, match="access denied"):
            RemoteCache(config(address, server_token="wrong"), NAMESPACE)
        good = RemoteCache(config(address, server_token="s3cret"), NAMESPACE)
        assert good.lookup(tokens(9, 2 * CHUNK)) == 0 and good.conn.up
        good.close()
        if os.getuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
            pytest.skip("the permission half runs a client as user nobody: needs root and the system python3")
        # Another user (nobody) with the system python (kvport's venv is not theirs to run): the socket (0600, in a
        # 0700 directory) and the shared memory (0600) keep it out, whatever token it has.
        arena = next(p for p in os.listdir("/dev/shm") if p.startswith(f"kvport-{srv.proc.pid}-"))
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "for what, attempt in (('socket', lambda: s.connect({!r})), ('shm', lambda: open({!r}, 'rb'))):\n"
            "    try:\n        attempt(); print(what, 'open')\n"
            "    except PermissionError:\n        print(what, 'denied')\n"
        ).format(address[len("ipc://") :], f"/dev/shm/{arena}")
        out = subprocess.run(
            ["/usr/bin/python3", "-c", code], capture_output=True, text=True, user="nobody", timeout=30
        )
        assert out.stdout.split("\n")[:2] == ["socket denied", "shm denied"], out


def test_tcp_on_loopback_works_with_shared_memory(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with ServerProcess(tmp_path, {"address": address}, {"l1_bytes": L1_BYTES}):
        writer, _ = _cache(address, seed=10)
        count = 4 * CHUNK
        assert writer.store(tokens(10, count), list(range(8))) == count
        reader, kv = _cache(address)
        assert reader.load(tokens(10, count), list(range(8, 16)), count) == count
        assert blocks_equal(nhd_kv(num_blocks=64, seed=10)[0], kv, list(range(8)), list(range(8, 16)))
        assert reader.stats()["server"]["transport"] == "shm"
        writer.close()
        reader.close()
