"""The Redis tier (also Valkey, same protocol): one key per chunk holding the sealed chunk envelope, every batch one
pipelined round trip. Owns the key naming, the client settings and how Redis answers map to read results; must not
hold chunk bytes beyond one call or let a secret reach a log line.

Config: ``{type: redis, url: "redis://[user[:password]@]host:6379/0", ttl: 3600, ...}`` or a URL (``rediss://`` for
TLS, ``unix:///run/redis.sock``); docs/cache.md lists every option."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvport.errors import UserError
from kvport.store.envelope import open_into, seal_header
from kvport.store.tiers.base import ReadResult, options_from
from kvport.store.tiers.remote import REMOTE_OPTIONS, RemoteTier, TierDown, parse_remote_options, redact_url

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

REDIS_PIN = "redis==8.1.0"  # the client version kvport is tested with (pyproject extra `redis`)
SSL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
OPTIONS = ("url", "username", "password", "password_env", "key_prefix", "ttl", "max_batch", *SSL_OPTIONS)
OPTIONS += REMOTE_OPTIONS
SCHEMES = ("redis", "rediss", "unix")
# Chunks per pipeline: bounds the reply bytes held at once (16 x 16 MiB chunks = 256 MiB) while keeping one round trip
# for a whole read-ahead window (prefetch_depth 4) or a lookup of up to 512 keys (lookups carry no values: unbounded).
DEFAULT_MAX_BATCH = 16


def parse_options(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked options of a redis tier spec; nothing is connected."""
    from kvport.cache.config import coerce_bool, coerce_positive_int

    opts = options_from(spec, OPTIONS, where)
    url = opts.get("url")
    if not isinstance(url, str) or not url:
        raise UserError(f"{where}: 'url' is required (redis://host:6379/0, rediss://..., unix:///path.sock)")
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise UserError(f"{where}: url {shown!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise UserError(f"{where}: url {shown!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.scheme == "unix" and not parts.path:
        raise UserError(f"{where}: url {shown!r}: expected unix:///path/to/redis.sock")
    if parts.scheme != "unix" and not parts.hostname:
        raise UserError(f"{where}: url {shown!r}: no host")
    out: dict[str, Any] = {"url": url, **parse_remote_options(opts, where)}
    if parts.password is not None and ("password" in opts or "password_env" in opts):
        raise UserError(f"{where}: url {shown!r} has a password and so does the spec; give it once")
    if "password" in opts and "password_env" in opts:
        raise UserError(f"{where}: give password or password_env, not both")
    out["username"] = str(opts["username"]) if opts.get("username") is not None else None
    out["password"] = str(opts["password"]) if opts.get("password") is not None else None
    out["password_env"] = str(opts["password_env"]) if opts.get("password_env") else None
    out["key_prefix"] = str(opts.get("key_prefix", "kvport:"))
    out["ttl"] = coerce_positive_int(opts["ttl"], f"{where}: ttl") if opts.get("ttl") not in (None, "") else None
    out["max_batch"] = coerce_positive_int(opts.get("max_batch", DEFAULT_MAX_BATCH), f"{where}: max_batch")
    ssl = {k: opts[k] for k in SSL_OPTIONS if k in opts}
    if ssl and parts.scheme != "rediss":
        raise UserError(f"{where}: {', '.join(ssl)} need a rediss:// url (TLS); url is {shown!r}")
    if "ssl_check_hostname" in ssl:
        ssl["ssl_check_hostname"] = coerce_bool(ssl["ssl_check_hostname"], f"{where}: ssl_check_hostname")
    if "ssl_cert_reqs" in ssl and ssl["ssl_cert_reqs"] not in ("required", "optional", "none"):
        raise UserError(f"{where}: ssl_cert_reqs={ssl['ssl_cert_reqs']!r}, expected required, optional or none")
    out["ssl"] = {k: (str(v) if not isinstance(v, bool) else v) for k, v in ssl.items()}
    _require_client(where)
    return out


def _require_client(where: str):
    try:
        import redis
    except ImportError:
        raise UserError(f"{where}: the redis tier needs the redis client: pip install 'kvport[redis]'") from None
    return redis


class RedisTier(RemoteTier):
    """Chunks as ``<key_prefix><chunk key>`` -> sealed envelope. A value that is missing (never stored, expired, evicted
    by ``maxmemory``) is a miss; one that fails validation is a miss, counted and deleted (another layout's chunk is
    counted and left alone). Puts are ``SET NX`` (a chunk present is not rewritten) with ``EX ttl`` when set."""

    kind = "redis"
    inline_bounded = True  # socket timeouts bound every call: lookups run on the caller's thread, no hop

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> RedisTier:
        return cls(metrics=metrics, where=where, **parse_options(spec, where))

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        retry_s: float,
        threads: int = 2,
        username: str | None = None,
        password: str | None = None,
        password_env: str | None = None,
        key_prefix: str = "kvport:",
        ttl: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        ssl: Mapping[str, Any] | None = None,
        metrics: CacheMetrics | None = None,
        where: str = "redis tier",
    ) -> None:
        redis = _require_client(where)
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        super().__init__(url, timeout_s, retry_s, threads, metrics)
        if password_env is not None:
            password = os.environ.get(password_env)
            if password is None:
                raise UserError(f"{where}: password_env={password_env!r} is not set in the environment")
        self.prefix = key_prefix.encode()
        self.ttl = ttl
        self.max_batch = max_batch
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            # No retries inside the client: one failed call marks the tier down at once, so no request ever waits
            # through a retry loop (redis-py retries 3 times with backoff by default).
            "retry": Retry(NoBackoff(), 0),
            "client_name": "kvport",
            **dict(ssl or {}),
        }
        if username is not None:
            kwargs["username"] = username
        if password is not None:
            kwargs["password"] = password
        self._redis = redis.Redis.from_url(url, **kwargs)
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._response_error = redis.exceptions.ResponseError
        self.start()

    @property
    def client(self):
        """The underlying redis-py client (the benchmark's raw reference runs on it)."""
        return self._redis

    def _name(self, key: str) -> bytes:
        return self.prefix + key.encode()

    def _call(self, fn):
        try:
            return fn()
        except self._errors as exc:
            raise TierDown(f"{type(exc).__name__}: {exc}") from None

    def _pipeline(self, commands) -> list[Any]:
        """Run ``commands(pipe)`` as one pipelined round trip; per-command errors come back as exception objects."""

        def run():
            pipe = self._redis.pipeline(transaction=False)
            commands(pipe)
            return pipe.execute(raise_on_error=False)

        return self._call(run)

    # ---- hooks -----------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        self._call(self._redis.ping)

    def _exists(self, keys: Sequence[str]) -> list[bool]:
        replies = self._pipeline(lambda p: [p.exists(self._name(k)) for k in keys])
        return [reply == 1 for reply in replies]

    def _read(self, keys, fingerprint, dsts) -> list[ReadResult]:
        results: list[ReadResult] = []
        for start in range(0, len(keys), self.max_batch):
            part = keys[start : start + self.max_batch]
            values = self._pipeline(lambda p, part=part: [p.get(self._name(k)) for k in part])
            bad = []
            for key, value, dst in zip(part, values, dsts[start : start + self.max_batch]):
                if value is None:
                    result = ReadResult.MISS
                elif isinstance(value, Exception):
                    result = ReadResult.IO_ERROR
                else:
                    result = open_into(value, key, fingerprint, _bytes_view(dst))
                if result in (ReadResult.CORRUPT, ReadResult.TRUNCATED):
                    bad.append(key)
                results.append(result)
            if bad:  # never read again; another layout's valid chunk (WRONG_FINGERPRINT) is left to its writer
                self._pipeline(lambda p, bad=bad: [p.delete(self._name(k)) for k in bad])
        return results

    def _write(self, keys, fingerprint, srcs) -> list[bool | None]:
        stored: list[bool | None] = []
        for start in range(0, len(keys), self.max_batch):
            part = list(zip(keys[start : start + self.max_batch], srcs[start : start + self.max_batch]))
            for reply in self._call(lambda part=part: self._set_nx(part, fingerprint)):
                # True: stored; None: already there (NX); an error reply (OOM under maxmemory noeviction...): dropped
                stored.append(True if reply is True else (None if reply is None else False))
        return stored

    def _set_nx(self, part, fingerprint: str) -> list[Any]:
        """Pipelined ``SET name value NX [EX ttl]`` whose value is sent as header then payload straight from the
        chunk buffer: the protocol is written here (as redis-py would) so the payload is never concatenated into a new
        bytes object (a 4 MiB concatenation took 3.8 ms on the dev VM, a quarter of a loopback SET's time)."""
        out: list[Any] = []
        small = bytearray()
        tail = [b"NX"] + ([b"EX", str(self.ttl).encode()] if self.ttl else [])
        for key, src in part:
            view = _bytes_view(src)
            header = seal_header(key, fingerprint, view)
            small += b"*%d\r\n" % (3 + len(tail))
            for arg in (b"SET", self._name(key)):
                small += b"$%d\r\n%s\r\n" % (len(arg), arg)
            small += b"$%d\r\n" % (len(header) + len(view))
            small += header
            out.append(bytes(small))
            out.append(view)
            small = bytearray(b"\r\n")
            for arg in tail:
                small += b"$%d\r\n%s\r\n" % (len(arg), arg)
        out.append(bytes(small))
        pool = self._redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(out, check_health=False)
            replies = []
            for _ in part:
                try:
                    reply = conn.read_response()
                except self._response_error as exc:  # one command's error reply; the stream stays in step
                    reply = exc
                replies.append(True if reply in (b"OK", "OK", True) else reply)
        except BaseException:
            conn.disconnect()  # a half-sent or half-read pipeline leaves the connection out of step
            raise
        finally:
            pool.release(conn)
        return replies

    def _remove(self, keys: Sequence[str]) -> None:
        self._pipeline(lambda p: [p.delete(self._name(k)) for k in keys])

    def _close_client(self) -> None:
        self._redis.close()


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tier buffers must be contiguous CPU tensors")
    return memoryview(tensor.numpy()).cast("B")
