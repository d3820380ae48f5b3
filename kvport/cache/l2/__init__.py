"""L2 tiers: storage behind the L1 pool (local disk now; shared servers later), one module per tier.
Owns only the tier table; must not import a tier module until it is used."""

from __future__ import annotations

from kvport.cache.l2.base import L2Tier, ReadResult

__all__ = ["L2Tier", "ReadResult"]
