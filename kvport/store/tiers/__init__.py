"""Storage tiers behind L1, one module per tier, registered by name here (a new tier is one file plus one row).
Owns the registry and building tiers from config specs; must not import a tier module before a config names it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvport.errors import UserError
from kvport.store.tiers.base import ReadResult, Tier

if TYPE_CHECKING:
    from kvport.store.metrics import CacheMetrics

# type -> "module:Class". Each class has ``from_spec(spec, where, metrics)``; its module has
# ``parse_options(spec, where)``, which checks a spec without connecting or touching storage.
TIERS: dict[str, str] = {
    "local_disk": "kvport.store.tiers.local_disk:LocalDiskTier",
}


def _module_and_class(kind: str, where: str):
    if kind not in TIERS:
        raise UserError(f"{where}: unknown tier type {kind!r} (known: {', '.join(TIERS)})")
    module_name, _, class_name = TIERS[kind].partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def check_tier_spec(spec: Any, where: str) -> dict[str, Any]:
    """A tier spec checked for its type's options (one-line UserError otherwise); returns it as a plain dict."""
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{type: local_disk, path: ...}}, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise UserError(f"{where}: 'type' is required (known: {', '.join(TIERS)})")
    module, _ = _module_and_class(kind, where)
    module.parse_options(spec, where)
    return {str(k): v for k, v in spec.items()}


def build_tier(spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> Tier:
    """Construct the tier a spec names (connecting or creating storage as that tier does)."""
    _, cls = _module_and_class(str(spec.get("type")), where)
    return cls.from_spec(spec, where, metrics)


__all__ = ["TIERS", "ReadResult", "Tier", "build_tier", "check_tier_spec"]
