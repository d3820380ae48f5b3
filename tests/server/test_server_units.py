"""Server parts without processes: the client's key cache, the server config, addresses, the shared L1's slots."""

from __future__ import annotations

import pickle

import pytest

from kvport.errors import UserError
from kvport.server.address import check_address
from kvport.server.config import load_server_config
from kvport.server.keycache import KeyCache
from kvport.store.keys import chunk_keys


def test_key_cache_gives_the_derived_keys_and_never_stale_ones() -> None:
    cache = KeyCache(4, "ns")
    tokens = list(range(18))
    assert cache.keys(tokens) == chunk_keys(tokens, 4, "ns") and cache.derived == 1
    assert cache.keys(tokens, 9) == chunk_keys(tokens[:8], 4, "ns") and cache.hits == 1
    assert cache.keys(pickle.loads(pickle.dumps(tokens))) == chunk_keys(tokens, 4, "ns") and cache.hits == 2
    changed = list(tokens)
    changed[5] = 999  # same length, same probe tokens (first, middle, last): must not reuse the entry
    assert cache.keys(changed) == chunk_keys(changed, 4, "ns")
    tokens[5] = 999  # the remembered list mutated in place by its owner: the copy still protects
    assert cache.keys(tokens) == chunk_keys(tokens, 4, "ns")
    assert cache.keys(tuple(range(18))) == chunk_keys(list(range(18)), 4, "ns")  # not a list: derived
    assert cache.keys(list(range(3))) == []


def test_key_cache_stays_bounded() -> None:
    cache = KeyCache(4, "ns", entries=3)
    for start in range(10):
        cache.keys(list(range(start, start + 8)))
    assert len(cache._lru) == 3


@pytest.mark.parametrize(
    "address",
    ["tcp://10.0.0.1:5555", "tcp://0.0.0.0:1", "tcp://example.com:80", "ipc://relative.sock", "http://x", "tcp://::1"],
)
def test_addresses_outside_loopback_or_malformed_are_refused(address: str) -> None:
    with pytest.raises(UserError, match="server"):
        check_address(address, "server")


@pytest.mark.parametrize(
    "address", ["ipc:///run/kvport.sock", "tcp://127.0.0.1:5555", "tcp://[::1]:1", "tcp://localhost:9"]
)
def test_loopback_and_ipc_addresses_are_accepted(address: str) -> None:
    assert check_address(address, "server") == address


def test_server_config_sections_and_one_line_errors(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("server:\n  address: ipc:///tmp/x.sock\n  mode: '0660'\ncache:\n  l1_bytes: 1GiB\n")
    server, cache = load_server_config(path)
    assert server.mode == 0o660 and server.address == "ipc:///tmp/x.sock" and cache.l1_bytes == 1 << 30
    for text, needle in (
        ("server:\n  colour: red\n", "unknown key 'colour'"),
        ("extra: 1\n", "unknown section"),
        ("server:\n  address: tcp://8.8.8.8:1\n", "loopback"),
        ("server:\n  client_share: 2\n", "client_share"),
        ("server:\n  mode: rwx\n", "octal"),
        ("cache:\n  server: ipc:///x.sock\n", "client setting"),
    ):
        path.write_text(text)
        with pytest.raises(UserError, match=needle) as info:
            load_server_config(path)
        assert "\n" not in str(info.value)


def test_shared_l1_sizes_slots_by_the_first_model_and_refuses_larger_chunks(tmp_path) -> None:
    from kvport.server.shared_l1 import SharedL1
    from kvport.server.shm import SharedArena
    from kvport.store.metrics import CacheMetrics

    arena = SharedArena.create(tmp_path, "a.l1", SharedL1.arena_bytes(64 * 4096), 0o600)
    try:
        l1 = SharedL1(arena, 64 * 4096, CacheMetrics("test-shared-l1"))
        small = l1.view_for(3000)
        assert small.slot_bytes == 4096 and small.num_slots == 64
        lease = small.reserve("a" * 64)
        assert lease.buffer.numel() == 3000 and arena.offset_of(lease.buffer) % 4096 == 0
        assert l1.view_for(4096).chunk_bytes == 4096
        with pytest.raises(UserError, match="slot_bytes"):
            l1.view_for(4097)
        assert (tmp_path / "a.l1").stat().st_mode & 0o777 == 0o600
    finally:
        arena.close()
    assert not (tmp_path / "a.l1").exists()


def test_key_cache_clear_forgets_everything_and_caches_again() -> None:
    cache = KeyCache(4, "ns", entries=4)
    tokens = list(range(16))
    for _ in range(50):
        cache.clear()
        cache.keys(tokens)
    derived = cache.derived
    cache.keys(tokens)
    assert cache.derived == derived and cache.hits >= 1


def test_key_cache_follows_the_key_scheme() -> None:
    from kvport.cache.config import load_config
    from kvport.store.chunk_store import ChunkStore

    tokens = list(range(40))
    for scheme in ("kvport", "sglang"):
        config = load_config(overrides={"chunk_tokens": 8, "key_scheme": scheme}, environ={})
        expected = ChunkStore(config, "ns").keys(tokens)  # what an in-process cache derives
        cache = KeyCache(8, "ns", scheme=scheme)
        assert cache.keys(tokens) == expected and cache.keys(tuple(tokens)) == expected
