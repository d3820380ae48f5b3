"""L2 tiers: storage behind the L1 pool (local disk now; shared servers later), one module per tier.
Exports the tier interface only; must not import a tier module before the engine's config asks for it."""

from __future__ import annotations

from kvport.cache.l2.base import L2Tier, ReadResult

__all__ = ["L2Tier", "ReadResult"]
