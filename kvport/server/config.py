"""`kvport server` settings: a YAML file with a `server:` section (this file's fields) and a `cache:` section (the
cache settings, kvport.cache.config, for L1 size and tiers), then command-line overrides. Owns parsing and checks;
must not open sockets or allocate."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from kvport.cache.config import CacheConfig, coerce_int, load_config, parse_bytes
from kvport.errors import UserError
from kvport.server.address import check_address
from kvport.yamlio import load_yaml


def default_address() -> str:
    """ipc socket under $XDG_RUNTIME_DIR (a per-user 0700 directory) when set, else under /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"ipc://{base}/kvport-{os.getuid()}/server.sock"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    address: str = dataclasses.field(default_factory=default_address)
    # Clients must present this token in their hello (compared in constant time). None: socket and shared-memory
    # permissions are the only access control.
    token: str | None = dataclasses.field(default=None, repr=False)
    token_file: str | None = None
    # Mode of the ipc socket and of the shared-memory file: 0600 (this user only) by default; 0660 lets the group
    # of `group` in.
    mode: int = 0o600
    group: str | None = None
    # Directory of the shared L1 file: a memory filesystem.
    shm_dir: str = "/dev/shm"
    # L1 slot size; None: the chunk size of the first model that opens (later, larger chunks are refused).
    slot_bytes: int | None = None
    # Most chunk bytes in one copy-transport message, and the ZMQ frame limit (a larger frame drops its peer).
    max_message_bytes: int = 256 << 20
    # Share of L1 slots one client may hold reserved or pinned at once, so one client cannot starve the others.
    client_share: float = 0.5
    # A copy-transport client whose process the server cannot see is dropped after this long without a message
    # (clients ping every quarter of it). Shared-memory clients are dropped only when their process is gone.
    client_timeout_s: float = 10.0
    # Threads for requests that touch tiers (lookups and loads past L1, flush), so a slow disk read never holds up
    # the event loop that answers every other client.
    threads: int = 4

    def __post_init__(self) -> None:
        check_address(self.address, "server config: address")
        checks = [
            ("mode", 0 <= self.mode <= 0o777, "a file mode such as 0600"),
            ("max_message_bytes", self.max_message_bytes >= 1 << 20, "at least 1 MiB"),
            ("client_share", 0 < self.client_share <= 1, "in (0, 1]"),
            ("client_timeout_s", self.client_timeout_s > 0, "positive"),
            ("threads", self.threads >= 1, "at least 1"),
            ("slot_bytes", self.slot_bytes is None or self.slot_bytes > 0, "a positive byte count or null"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise UserError(f"server config: {name}={getattr(self, name)!r}, expected {expected}")

    def resolved_token(self) -> str | None:
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise UserError(f"server config: token_file {self.token_file}: {exc.strerror}") from None
        if not token:
            raise UserError(f"server config: token_file {self.token_file} is empty")
        return token


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    if value is None:
        return None
    if name in ("slot_bytes", "max_message_bytes"):
        return parse_bytes(value, where)
    if name == "mode":
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise UserError(f"{where}: {value!r} is not an octal file mode (e.g. '0660')") from None
        return coerce_int(value, where)
    if name == "threads":
        return coerce_int(value, where)
    if name in ("client_share", "client_timeout_s"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: {value!r} is not a number")
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{where}: {value!r} is not a number") from None
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: {str(value)[:60]} is not a string")
    return str(value)


def load_server_config(
    path: str | os.PathLike | None, server_overrides: dict[str, Any] | None = None
) -> tuple[ServerConfig, CacheConfig]:
    """(server settings, cache settings) from ``path`` (sections `server:` and `cache:`), then overrides; the
    cache part also honours KVPORT_* variables like every cache config."""
    server: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    source = f"server config {path}" if path else "server config"
    if path is not None:
        data = load_yaml(Path(path), source) or {}
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping with `server:` and `cache:` sections")
        unknown = sorted(str(k) for k in data if k not in ("server", "cache"))
        if unknown:
            raise UserError(f"{source}: unknown section(s) {', '.join(unknown)} (expected server, cache)")
        for section, into in (("server", server), ("cache", cache)):
            value = data.get(section) or {}
            if not isinstance(value, dict):
                raise UserError(f"{source}: `{section}:` must be a mapping")
            into.update({str(k): v for k, v in value.items()})
    server.update({k: v for k, v in (server_overrides or {}).items() if v is not None})
    values = {}
    for key, value in server.items():
        if key not in _FIELDS:
            raise UserError(f"{source}: server: unknown key {key!r} (known: {', '.join(_FIELDS)})")
        values[key] = _coerce(key, value, f"{source}: server: {key}")
    if cache.get("server") is not None:
        raise UserError(f"{source}: cache: server is a client setting; the server's own address is server: address")
    environ = {k: v for k, v in os.environ.items() if k != "KVPORT_CONFIG"}  # the file above is the config
    return ServerConfig(**values), load_config(None, cache, environ)
