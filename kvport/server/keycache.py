"""Chunk keys of recent prompts, so a process derives a prompt's keys once however often it asks: vLLM's scheduler
looks a waiting request up every step, and its worker stores a prompt chunk by chunk. Owns the cache and its
content check; must not change how keys are derived (kvport.store.keys)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

from kvport.store.keys import chunk_keys

# Prompts remembered: as many as the requests one scheduler step considers (vLLM's max_num_seqs defaults to 256 on
# GPUs), and at most 4M tokens in all: an entry holds a copy of its prompt, 8 bytes per token of list slots (the
# ints are shared), so the cache stays under ~32 MiB plus the keys (~100 bytes per chunk).
ENTRIES = 256
MAX_TOKENS = 1 << 22


class KeyCache:
    """``keys(tokens, num_tokens)``: the keys of the full chunks of ``tokens[:num_tokens]``. A remembered prompt is
    used only when its tokens compare equal to the caller's (C-speed list comparison: 0.08 ms for a 128K-token
    prompt passed as the same list, 1.2 ms as an equal copy, vs 2.6 ms to derive its 512 keys on the 2-core dev VM),
    so a stale entry can never give wrong keys. Only lists are remembered; other sequences are derived each time."""

    def __init__(
        self, chunk_tokens: int, namespace: str, salt: str = "", entries: int = ENTRIES, scheme: str = "kvport"
    ) -> None:
        """``scheme``: the cache config's key_scheme (kvport's chain, or SGLang's page hashes)."""
        self.chunk_tokens, self.namespace, self.salt, self.entries = chunk_tokens, namespace, salt, entries
        self.scheme = scheme
        self._lock = threading.Lock()
        self._lru: collections.OrderedDict[tuple, tuple[list, list[str]]] = collections.OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.derived = 0

    def _derive(self, tokens, extra: bytes = b"") -> list[str]:
        # The same rule as ChunkStore.iter_keys: SGLang page keys carry no per-request component.
        if self.scheme == "sglang" and not extra:
            from kvport.store.page_keys import iter_page_keys

            return list(iter_page_keys(tokens, self.chunk_tokens, self.namespace, self.salt))
        return chunk_keys(tokens, self.chunk_tokens, self.namespace, self.salt, extra)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._tokens = 0

    def keys(self, tokens: Sequence[int], num_tokens: int | None = None, extra: bytes = b"") -> list[str]:
        """``extra``: the request's own key-root component (LoRA, cache_salt, ...; kvport.store.keys)."""
        num_tokens = len(tokens) if num_tokens is None else min(num_tokens, len(tokens))
        chunks = num_tokens // self.chunk_tokens
        if chunks == 0:
            return []
        if type(tokens) is not list:
            self.derived += 1
            return self._derive(tokens[: chunks * self.chunk_tokens], extra)
        probe = (len(tokens), tokens[0], tokens[len(tokens) // 2], tokens[-1], extra)
        with self._lock:
            entry = self._lru.get(probe)
            if entry is not None:
                self._lru.move_to_end(probe)
        if entry is not None and entry[0] == tokens:
            self.hits += 1
            return entry[1][:chunks]
        self.derived += 1
        keys = self._derive(tokens, extra)
        if len(tokens) > MAX_TOKENS:
            return keys[:chunks]
        with self._lock:
            old = self._lru.pop(probe, None)
            self._tokens += len(tokens) - (len(old[0]) if old else 0)
            self._lru[probe] = (list(tokens), keys)
            while len(self._lru) > self.entries or self._tokens > MAX_TOKENS:
                self._tokens -= len(self._lru.popitem(last=False)[1][0])
        return keys[:chunks]
