"""The cache engine: chunk keys, the L1 host pool, L2 tiers, the async pipeline, config and metrics.
Exports the public API; must not import torch or create pools at import time."""

from __future__ import annotations

from kvport.cache.config import CacheConfig, load_config
from kvport.cache.engine import CacheEngine
from kvport.cache.pipeline import Handle

__all__ = ["CacheConfig", "CacheEngine", "Handle", "load_config"]
