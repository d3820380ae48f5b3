"""Cache configuration: one dataclass, loaded from a YAML file, ``KVPORT_*`` environment variables and overrides.
Owns parsing, defaults and validation of cache settings; must not allocate memory, touch disk tiers or import torch."""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvport.errors import UserError
from kvport.store.tiers import check_tier_spec
from kvport.yamlio import load_yaml

GiB = 1 << 30
KEY_SCHEMES = ("kvport", "sglang")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Every cache setting with its default; docs/cache.md documents each field."""

    # Tokens per chunk; must be a multiple of every layer group's tokens_per_block (checked at bind).
    chunk_tokens: int = 256
    # Host memory for the L1 pool, allocated once at bind (pinned when a CUDA/ROCm device exists).
    l1_bytes: int = 2 * GiB
    # Storage tiers behind L1, fastest first: a list of specs such as
    # [{type: local_disk, path: /var/cache/kvport, bytes: 64GiB}] (kvport.store.tiers lists the types).
    tiers: tuple = ()
    # Shorthand for one local_disk tier in front of ``tiers`` (kept from the first release): its directory
    # (None: no disk tier), capacity and whether each chunk file is fsynced before it becomes visible.
    l2_path: str | None = None
    l2_bytes: int = 64 * GiB
    l2_fsync: bool = False
    # Tenant isolation: different salts never share a key.
    salt: str = ""
    # How chunk keys derive from tokens: "kvport" (blake2b chain over int64 token chunks) or "sglang" (SGLang
    # HiCache's page-hash chain, chunks = SGLang pages; kvport/store/page_keys.py). Engines that share chunks with
    # SGLang use "sglang" with chunk_tokens equal to SGLang's page size.
    key_scheme: str = "kvport"
    # Copy backend name (as in the registry); None lets the registry pick (and honours KVPORT_BACKEND).
    backend: str | None = None
    # Transfer path on GPUs: auto (the planner), dma (copy engines), staged (SM gather + copy) or zero-copy. Which is
    # fastest differs between machines of one kind (docs/performance.md, H200): pin it where you measured. `auto` is
    # also told whether the engine orders its next forward after a move's release (``engine_waits``: the vLLM
    # worker's loads and synchronous stores) and then takes the staged path: 0.03 ms of waiting per 256-token
    # Llama-3-8B chunk against 0.62 ms on the copy engines (H200, `kvport bench kernels --load engine`).
    transfer_path: str = "auto"
    # Write chunks to L2 in background threads; False writes them before store() returns.
    async_store: bool = True
    # Read L2 chunks ahead of the one being scattered during a load.
    prefetch: bool = True
    # Background threads reading L2 (load read-ahead, prefetch).
    io_threads: int = 2
    # Background threads writing L2. Two: on the H100 device machine (16 cores) `kvport bench storage --cold` stored
    # at 1.05-1.14x raw sequential write with two writers vs 0.85x with one; on the 2-core dev VM one writer was
    # faster (0.36-0.66 vs 0.24-0.26 GB/s), so small boxes should set 1.
    l2_write_threads: int = 2
    # Most chunks waiting for an L2 write; past it a chunk stays in L1 only (counted as dropped).
    max_pending_stores: int = 256
    # Chunks an L2 load reads ahead of the scatter.
    prefetch_depth: int = 4
    # Serve Prometheus metrics on this port (None: only in-process registry). The host process serves them (the
    # engine adapter or `kvport server`), never the cache itself.
    metrics_port: int | None = None
    # Address the metrics port binds to: loopback by default, so KV statistics are not exposed to the network.
    metrics_host: str = "127.0.0.1"
    # Use a node's `kvport server` instead of an in-process cache (docs/server.md): its address, ipc:///path/to.sock
    # or tcp://127.0.0.1:PORT (loopback only). None: the in-process cache (the default).
    server: str | None = None
    # The server's access token if it requires one (better set through KVPORT_SERVER_TOKEN than in an engine's
    # config, which engines log).
    server_token: str | None = dataclasses.field(default=None, repr=False)
    # shm: KV bytes move through the server's shared memory (the client maps it); copy: over the socket, only for a
    # client that cannot map it (another container or mount namespace). Never chosen silently.
    server_transport: str = "shm"
    # Longest wait for a server reply; past it the server counts as down (misses, stores skipped) until a
    # background reconnect succeeds. A reply takes well under 1 ms on loopback.
    server_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        checks = [
            ("chunk_tokens", self.chunk_tokens > 0, "a positive integer"),
            ("l1_bytes", self.l1_bytes >= 0, "a non-negative byte count"),
            ("l2_bytes", self.l2_bytes > 0, "a positive byte count"),
            ("io_threads", self.io_threads >= 1, "at least 1"),
            ("l2_write_threads", self.l2_write_threads >= 1, "at least 1"),
            ("max_pending_stores", self.max_pending_stores >= 1, "at least 1"),
            ("prefetch_depth", self.prefetch_depth >= 1, "at least 1"),
            ("metrics_port", self.metrics_port is None or 0 < self.metrics_port < 65536, "a TCP port or null"),
            (
                "transfer_path",
                self.transfer_path in ("auto", "dma", "staged", "zero-copy"),
                "auto, dma, staged or zero-copy",
            ),
            ("key_scheme", self.key_scheme in KEY_SCHEMES, " or ".join(KEY_SCHEMES)),
            ("server_transport", self.server_transport in ("shm", "copy"), "shm or copy"),
            ("server_timeout_ms", self.server_timeout_ms >= 1, "at least 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise UserError(f"cache config: {name}={getattr(self, name)!r}, expected {expected}")
        specs = tuple(check_tier_spec(spec, f"cache config: tiers[{i}]") for i, spec in enumerate(self.tiers or ()))
        object.__setattr__(self, "tiers", specs)
        disks = [s for s in specs if s.get("type") == "local_disk"]
        if self.l2_path is not None and disks:
            raise UserError(
                "cache config: l2_path and a local_disk tier are both set; keep one (write the disk tier as "
                "tiers: [{type: local_disk, path: ..., bytes: ...}])"
            )

    def tier_specs(self) -> tuple[dict[str, Any], ...]:
        """Every tier, fastest first: the ``l2_path`` shorthand (if set) then ``tiers``."""
        if self.l2_path is None:
            return self.tiers
        disk = {
            "type": "local_disk",
            "path": self.l2_path,
            "bytes": self.l2_bytes,
            "fsync": self.l2_fsync,
            "read_threads": self.io_threads,
            "write_threads": self.l2_write_threads,
        }
        return (disk, *self.tiers)


_FIELDS = {f.name: f for f in dataclasses.fields(CacheConfig)}
_BYTE_FIELDS = {"l1_bytes", "l2_bytes"}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
_UNITS |= {"tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
# ASCII digits only ([0-9], not \d: int() would take Arabic-Indic digits); at most 19 before the point (int64).
_BYTES_RE = re.compile(r"^\s*([0-9]{1,19}(?:\.[0-9]{1,19})?)\s*([a-zA-Z]*)\s*$")
_INT_RE = re.compile(r"^\s*[+-]?[0-9]{1,19}\s*$")
# Byte counts and integers must fit in int64: what allocation sizes, file offsets and torch shapes take.
MAX_INT = (1 << 63) - 1


def parse_bytes(value: Any, where: str) -> int:
    """An int, or a string such as ``"4GiB"`` / ``"1.5 MB"`` (binary and decimal units); a count that is not a whole
    number of bytes (``1.5``, ``0.1KiB``) is refused, not truncated, and so is one past int64."""
    expected = "expected e.g. 1073741824 or '1GiB'"
    given = value
    if isinstance(value, bool):
        raise UserError(f"{where}: {value!r} is not a byte count ({expected})")
    if isinstance(value, float):  # YAML reads 1.0e+9 and 1.5 as floats
        if not math.isfinite(value):
            raise UserError(f"{where}: {value!r} is not a byte count ({expected})")
        if not value.is_integer():
            raise UserError(f"{where}: {value!r} is not a whole number of bytes")
        value = int(value)
    if isinstance(value, int):
        nbytes = value
    else:
        match = _BYTES_RE.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise UserError(f"{where}: {_short(value)} is not a byte count ({expected})")
        exact = fractions.Fraction(match.group(1)) * _UNITS[unit]  # exact: float(1.1) * 10**9 is not 1.1e9
        if exact.denominator != 1:
            raise UserError(f"{where}: {_short(value)} is not a whole number of bytes")
        nbytes = int(exact)
    if nbytes > MAX_INT:
        raise UserError(f"{where}: {_short(given)} is more than 2**63-1 bytes")
    return nbytes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{where}: {value!r} is not a boolean (expected true/false)")


def coerce_int(value: Any, where: str) -> int:
    text_int = isinstance(value, str) and _INT_RE.match(value)
    if isinstance(value, bool) or not (isinstance(value, int) or text_int):
        raise UserError(f"{where}: {_short(value)} is not an integer")
    number = int(value)
    if abs(number) > MAX_INT:
        raise UserError(f"{where}: {_short(value)} does not fit in 64 bits")
    return number


def coerce_positive_int(value: Any, where: str) -> int:
    number = coerce_int(value, where)
    if number < 1:
        raise UserError(f"{where}: {number}, expected at least 1")
    return number


def _coerce_tiers(value: Any, where: str) -> tuple:
    if isinstance(value, str):  # from the environment: KVPORT_TIERS='[{type: local_disk, path: /x}]'
        from kvport.yamlio import parse_yaml

        value = parse_yaml(value, where)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: expected a list of tier specs like [{{type: local_disk, path: ...}}]")
    return tuple(value)


def _coerce(name: str, value: Any, where: str) -> Any:
    if name == "tiers":
        return _coerce_tiers(value, where)
    if name in _BYTE_FIELDS:
        return parse_bytes(value, where)
    kind = _FIELDS[name].type
    optional = "None" in kind
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise UserError(f"{where}: null is not allowed (expected {kind})")
    if kind.startswith("bool"):
        return coerce_bool(value, where)
    if kind.startswith("int"):
        return coerce_int(value, where)
    if kind.startswith("str"):
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: {_short(value)} is not a string")
        text = str(value)
        if name == "l2_path":
            text = os.path.expanduser(text)  # `~/cache` means the home directory, not a directory named `~`
        if name == "backend":
            _check_backend(text, where)
        if name == "server":
            from kvport.server.address import check_address  # noqa: PLC0415 - only when a server is configured

            check_address(text, where)
        return text
    raise AssertionError(f"unhandled config field type {kind}")  # a new field type needs a case above


def _check_backend(name: str, where: str) -> None:
    from kvport.hal.registry import BACKENDS  # noqa: PLC0415 - the registry is imported only when a name is given

    if name not in BACKENDS:
        raise UserError(f"{where}: unknown backend {_short(name)} (known: {', '.join(BACKENDS)})")


def _from_yaml(path: Path) -> dict[str, Any]:
    data = load_yaml(path, f"cache config {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"cache config {path}: expected a mapping of settings, got {type(data).__name__}")
    # A file holds the settings at top level or in a `cache:` section that is its only key: kvport reads no other
    # section, so a key beside it (a misplaced setting, a typo) would otherwise go unchecked or be misreported.
    if isinstance(data.get("cache"), dict):
        others = sorted(str(k) for k in data if k != "cache")
        if others:
            raise UserError(f"cache config {path}: keys beside the 'cache' section ({', '.join(others)}); move them in")
        data = data["cache"]
    return {str(k): v for k, v in data.items()}


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CacheConfig:
    """Defaults < YAML file (``path``, else ``$KVPORT_CONFIG``) < ``KVPORT_<FIELD>`` env < ``overrides``.

    Unknown keys in the file or in overrides are a UserError naming the key. Environment variables are read only
    for known fields (other kvport components own other ``KVPORT_*`` names, e.g. KVPORT_PLATFORM).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path is None and environ.get("KVPORT_CONFIG"):
        path = environ["KVPORT_CONFIG"]
    layers: list[tuple[str, dict[str, Any]]] = []
    origins: dict[str, str] = {}
    if path is not None:
        layers.append((f"cache config {path}", _from_yaml(Path(path))))
    env = {name: environ[f"KVPORT_{name.upper()}"] for name in _FIELDS if f"KVPORT_{name.upper()}" in environ}
    layers.append(("environment", env))
    layers.append(("cache config overrides", dict(overrides or {})))
    for source, layer in layers:
        for key, value in layer.items():
            if key not in _FIELDS:
                known = ", ".join(_FIELDS)
                raise UserError(f"{source}: unknown key {key!r} (known: {known})")
            where = f"KVPORT_{key.upper()}" if source == "environment" else f"{source}: {key}"
            values[key] = _coerce(key, value, where)
            origins[key] = f"KVPORT_{key.upper()}" if source == "environment" else source
    try:
        return CacheConfig(**values)
    except UserError as exc:  # a range check of the dataclass: say where the value came from (a file, the env)
        text = str(exc).removeprefix("cache config: ")
        blamed = [origin for key, origin in origins.items() if text.startswith(f"{key}=")]
        if not blamed:
            raise
        raise UserError(f"{blamed[0]}: {text}") from None


def check_machine_limits(config: CacheConfig, source: str = "cache config") -> None:
    """What this machine can hold, checked before anything is allocated (CacheEngine.bind calls it): an L1 pool larger
    than the memory (or than what is available now), a disk tier (l2_path or in tiers) larger than its filesystem.
    One UserError line, starting with ``source`` (e.g. ``cache config /etc/kv.yaml``)."""
    from kvport.machine import available_memory, disk_space, total_memory  # noqa: PLC0415

    total, free = total_memory(), available_memory()
    if total is not None and config.l1_bytes > total:
        raise UserError(
            f"{source}: l1_bytes={_size(config.l1_bytes)} is more than this machine's memory ({_size(total)})"
        )
    if free is not None and config.l1_bytes > free:
        raise UserError(
            f"{source}: l1_bytes={_size(config.l1_bytes)} is more than the memory available now ({_size(free)})"
        )
    if config.l2_path is not None:
        space = disk_space(config.l2_path)
        if space is not None and config.l2_bytes > space.total:
            raise UserError(
                f"{source}: l2_bytes={_size(config.l2_bytes)} is more than the filesystem of l2_path "
                f"{config.l2_path} ({_size(space.total)})"
            )
    for i, spec in enumerate(config.tiers):
        if spec.get("type") == "local_disk":
            from kvport.store.tiers.local_disk import parse_options  # noqa: PLC0415

            opts = parse_options(spec, f"{source}: tiers[{i}]")
            space = disk_space(opts["path"])
            if space is not None and opts["bytes"] > space.total:
                raise UserError(
                    f"{source}: tiers[{i}] bytes={_size(opts['bytes'])} is more than the filesystem of "
                    f"{opts['path']} ({_size(space.total)})"
                )


def _size(nbytes: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} bytes"
