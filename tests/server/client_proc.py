"""Test helper, run as a subprocess: a kvport server client that does one thing and then waits to be killed (or
exits), printing one line when it got there, so tests can `kill -9` it at a known point."""

from __future__ import annotations

import sys
import time

from kvport.cache.config import load_config
from kvport.server import protocol as P
from kvport.server.remote import RemoteCache
from kvport.testing.kv import nhd_kv

CHUNK = 32
NAMESPACE = "server-tests"


def config(address: str, **extra):
    # A generous reply timeout: on a loaded 2-core CI box a reply can take seconds; the down-server test sets its own.
    extra = {"server_timeout_ms": 10_000, **extra}
    return load_config(overrides={"server": address, "chunk_tokens": CHUNK, **extra}, environ={})


def tokens(seed: int, count: int) -> list[int]:
    return [seed * 100_000 + i for i in range(count)]


def main(mode: str, address: str, seed: int, count: int) -> None:
    kv, desc = nhd_kv(num_blocks=64, seed=seed)
    cache = RemoteCache(config(address), NAMESPACE)
    cache.bind(desc)
    toks = tokens(seed, count)
    blocks = list(range(count // 16))
    if mode == "store":
        print("stored", cache.store(toks, blocks), flush=True)
        cache.close()
        return
    keys = cache.chunk_keys(toks)
    if mode == "reserve-and-hang":
        reply, _ = cache.conn.call("reserve", {"ns": NAMESPACE, "start": 0}, [P.keys_frame(keys)])
        for offset in reply["off"][: len(reply["off"]) // 2 + 1]:  # half-written, as a gather cut short
            cache._arena.view(offset, cache.chunk_bytes).fill_(0xAB)
        print("reserved", len(reply["idx"]), flush=True)
    elif mode == "pin-and-hang":
        cache.store(toks, blocks)
        reply, _ = cache.conn.call("pin", {"ns": NAMESPACE}, [P.keys_frame(keys)])
        print("pinned", reply["chunks"], flush=True)
    elif mode == "flood":  # requests as fast as the socket takes them, never reading a reply
        import zmq

        frame = P.keys_frame(keys)
        sent = 0
        with cache.conn._lock:  # keep the connection's ping thread off the socket
            for i in range(count):
                header = {"v": P.VERSION, "op": "lookup", "id": 1_000_000 + i, "ns": NAMESPACE}
                try:
                    cache.conn._sock.send_multipart(P.encode(header, [frame]))
                except zmq.Again:
                    break
                sent += 1
            print("flooded", sent, flush=True)
            time.sleep(3600)
    time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
