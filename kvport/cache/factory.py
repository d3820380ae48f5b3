"""Which cache an engine adapter gets: the in-process CacheEngine (the default) or, when the config names a
`kvport server`, the facade that uses it. Owns only that choice; must not import the server code otherwise."""

from __future__ import annotations

from typing import Any

from kvport.cache.config import CacheConfig


def open_cache(config: CacheConfig, namespace: str) -> Any:
    """A CacheEngine, or a kvport.server.remote.RemoteCache when ``config.server`` is set (same interface)."""
    if config.server:
        from kvport.server.address import require_zmq

        require_zmq()
        from kvport.server.remote import RemoteCache

        return RemoteCache(config, namespace)
    from kvport.cache.engine import CacheEngine

    return CacheEngine(config, namespace)
