"""Storage tiers behind L1, one module per tier, registered by name here (a new tier is one file plus one row).
Owns the registry, the options every tier shares (``write``), tier URLs and building tiers from config specs; must not
import a tier module before a config names it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from kvport.errors import UserError
from kvport.store.tiers.base import ReadResult, Tier

if TYPE_CHECKING:
    from kvport.store.metrics import CacheMetrics

# type -> "module:Class". Each class has ``from_spec(spec, where, metrics)``; its module has
# ``parse_options(spec, where)``, which checks a spec without connecting or touching storage.
TIERS: dict[str, str] = {
    "local_disk": "kvport.store.tiers.local_disk:LocalDiskTier",
    "redis": "kvport.store.tiers.redis:RedisTier",
    "mooncake": "kvport.store.tiers.mooncake:MooncakeTier",
}
# URL scheme -> tier type, for `tiers: [redis://host:6379]` and `kvport bench storage --backend URL`.
SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "mooncake": "mooncake"}
# Options every tier takes, handled here (the policy lives in ChunkStore, not in the tier).
COMMON_OPTIONS = ("write",)
WRITE_POLICIES = ("through", "back")


def spec_from_url(url: str, where: str) -> dict[str, Any]:
    """A tier spec from a URL: ``redis://[user:pass@]host:port/db?ttl=3600``, ``rediss://...``, ``unix:///path.sock``,
    ``mooncake://MASTER:PORT?protocol=tcp``, ``local-disk:/path``. Query parameters become the tier's options."""
    if url.startswith(("local-disk:", "local_disk:")):
        path = url.partition(":")[2]
        if not path:
            raise UserError(f"{where}: {url!r}: expected local-disk:/path/to/directory")
        return {"type": "local_disk", "path": path}
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        known = ", ".join([*(f"{s}://" for s in SCHEMES), "local-disk:PATH"])
        raise UserError(f"{where}: {_redacted(url)!r} is not a tier URL (known: {known})")
    parts = urlsplit(url)
    # The URL as given up to its query (urlsplit().geturl() would turn unix:///path into unix:/path).
    spec: dict[str, Any] = {"type": SCHEMES[scheme], "url": url.split("#", 1)[0].split("?", 1)[0]}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise UserError(f"{where}: {_redacted(url)!r}: the query is not name=value&... pairs") from None
    for name, value in pairs:
        if not name:
            raise UserError(f"{where}: {_redacted(url)!r}: the query is not name=value&... pairs")
        if name in spec:
            raise UserError(f"{where}: {_redacted(url)!r}: option {name!r} given twice")
        spec[name] = value
    return spec


def _redacted(url: str) -> str:
    from kvport.store.tiers.remote import redact_url

    return redact_url(url)


def shown_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A tier spec as it may be printed or logged: the URL's password and any password option replaced by ``***``."""
    out = {str(k): v for k, v in spec.items()}
    if isinstance(out.get("url"), str):
        out["url"] = _redacted(out["url"])
    for key in ("password", "token", "secret"):
        if key in out:
            out[key] = "***"
    return out


def _module_and_class(kind: str, where: str):
    if kind not in TIERS:
        raise UserError(f"{where}: unknown tier type {kind!r} (known: {', '.join(TIERS)})")
    module_name, _, class_name = TIERS[kind].partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def _tier_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in spec.items() if k not in COMMON_OPTIONS}


def check_tier_spec(spec: Any, where: str) -> dict[str, Any]:
    """A tier spec (a mapping, or a URL string) checked for its type's options (one-line UserError otherwise);
    returns it as a plain dict."""
    if isinstance(spec, str):
        spec = spec_from_url(spec, where)
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: expected a mapping like {{type: local_disk, path: ...}}, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str):
        raise UserError(f"{where}: 'type' is required (known: {', '.join(TIERS)})")
    module, _ = _module_and_class(kind, where)
    write = spec.get("write", "through")
    if write not in WRITE_POLICIES:
        raise UserError(f"{where}: write={write!r}, expected one of {', '.join(WRITE_POLICIES)}")
    if write == "back":
        # Write-back needs the faster tier's eviction to wait for (or hand over) the chunk it drops; L1 and the disk
        # tier evict without a hook today, so `back` would silently lose chunks: refused rather than faked.
        raise UserError(f"{where}: write=back is not implemented (every tier is written through); use write: through")
    module.parse_options(_tier_options(spec), where)
    return {str(k): v for k, v in spec.items()}


def build_tier(spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> Tier:
    """Construct the tier a spec names (connecting or creating storage as that tier does)."""
    _, cls = _module_and_class(str(spec.get("type")), where)
    return cls.from_spec(_tier_options(spec), where, metrics)


__all__ = ["TIERS", "ReadResult", "Tier", "build_tier", "check_tier_spec", "shown_spec", "spec_from_url"]
