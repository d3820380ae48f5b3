"""The server's namespaces: one ChunkStore per model shard (namespace), all sharing the server's tiers and its one
L1. Owns creation on first use and the checks that keep one namespace's chunks one shape (chunk size, layout
fingerprint); must not talk to clients."""

from __future__ import annotations

import dataclasses
import threading

from kvport.cache.config import CacheConfig
from kvport.errors import UserError
from kvport.server.shared_l1 import NamespaceL1, SharedL1
from kvport.store.chunk_store import ChunkStore
from kvport.store.metrics import CacheMetrics
from kvport.store.tiers.base import Tier

# Namespaces one server hosts at most: each is a model shard (model, dtype, tensor-parallel rank), so even a node
# serving several models with tp 8 stays far below; past it a client error, never unbounded growth.
MAX_NAMESPACES = 1024


@dataclasses.dataclass
class Namespace:
    name: str
    store: ChunkStore
    chunk_tokens: int = 0  # 0 until a worker opens it (lookups need no L1)
    chunk_bytes: int = 0
    fingerprint: str = ""
    l1: NamespaceL1 | None = None


class Namespaces:
    def __init__(self, config: CacheConfig, tiers: list[Tier], l1: SharedL1) -> None:
        self.config, self.tiers, self.l1 = config, tiers, l1
        self._lock = threading.Lock()
        self._by_name: dict[str, Namespace] = {}

    def get(self, name: str) -> Namespace:
        """The namespace, created on first use (a scheduler may look up before any worker opened it)."""
        with self._lock:
            ns = self._by_name.get(name)
            if ns is None:
                if not name:
                    raise UserError("empty namespace")
                if len(self._by_name) >= MAX_NAMESPACES:
                    raise UserError(f"this server already hosts {MAX_NAMESPACES} namespaces")
                metrics = CacheMetrics(_label(name))
                ns = self._by_name[name] = Namespace(name, ChunkStore(self.config, name, metrics, tiers=self.tiers))
            return ns

    def open(self, name: str, chunk_tokens: int, chunk_bytes: int, fingerprint: str) -> Namespace:
        """Give a namespace its L1 (first worker) or check that a later worker's chunks have the same shape: two
        layouts under one namespace would serve one model's bytes to another."""
        ns = self.get(name)
        with self._lock:
            if ns.l1 is None:
                if chunk_bytes <= 0 or chunk_tokens <= 0:
                    raise UserError(f"namespace {name[:80]}: chunk_tokens and chunk_bytes must be positive")
                for tier in self.tiers:
                    tier.check_chunk(chunk_bytes)  # a tier that cannot hold one chunk would keep nothing
                ns.l1 = self.l1.view_for(chunk_bytes)
                ns.chunk_tokens, ns.chunk_bytes, ns.fingerprint = chunk_tokens, chunk_bytes, fingerprint
                ns.store.use_l1(ns.l1, fingerprint)
            elif (chunk_tokens, chunk_bytes, fingerprint) != (ns.chunk_tokens, ns.chunk_bytes, ns.fingerprint):
                raise UserError(
                    f"namespace {name[:80]} is served with chunks of {ns.chunk_tokens} tokens, {ns.chunk_bytes} "
                    f"bytes, layout {ns.fingerprint[:80]}; this client has {chunk_tokens} tokens, {chunk_bytes} bytes, "
                    f"layout {fingerprint[:80]}"
                )
            return ns

    def all(self) -> list[Namespace]:
        with self._lock:
            return list(self._by_name.values())

    def close(self) -> None:
        for ns in self.all():
            ns.store.close(drain=True)
        for tier in self.tiers:
            tier.close()


def _label(namespace: str) -> str:
    from kvport.cache.engine import _metrics_label

    return _metrics_label(namespace)
