"""The local cache facade: a chunk store (kvport.store) and a mover (descriptor + backend + transfer), its config.
Exports the public API; must not import torch or create pools at import time."""

from __future__ import annotations

from kvport.cache.config import CacheConfig, load_config
from kvport.cache.engine import CacheEngine
from kvport.cache.pipeline import Handle, Ticket

__all__ = ["CacheConfig", "CacheEngine", "Handle", "Ticket", "load_config"]
