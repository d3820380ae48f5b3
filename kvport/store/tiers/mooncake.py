"""The Mooncake Store tier: chunks moved zero-copy between registered L1 memory and the store's segments, one batched
call per request. Owns the client setup, buffer registration, the header arena and how Mooncake's return codes map to
read results; must not copy a chunk's payload through Python or serve a payload whose checksum it did not verify.

A stored object is the sealed envelope, header then payload, as in every tier. L1 slots hold payloads only, so each
put sends two pieces (the 128-byte header from a small registered arena, the payload straight from the L1 slot) into
one object, and each get lands the header in the arena and the payload straight in the L1 slot. The payload is then
checked in place: its xxh3-128 must equal the header's (and key, fingerprint and length must match) before the
slot is committed, so a torn, foreign or overwritten object is a miss and never becomes visible in L1.

Config: ``{type: mooncake, url: "mooncake://MASTER:50051", metadata_server: P2PHANDSHAKE, protocol: tcp}``."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvport.errors import UserError
from kvport.store.envelope import HEADER_BYTES, Header, checksum, open_header, seal_header
from kvport.store.tiers.base import ReadResult, options_from
from kvport.store.tiers.remote import REMOTE_OPTIONS, RemoteTier, TierDown, parse_remote_options, redact_url

if TYPE_CHECKING:
    import torch

    from kvport.store.metrics import CacheMetrics

MOONCAKE_PIN = "mooncake-transfer-engine-non-cuda==0.3.13.post1"  # the client kvport is tested with (extra `mooncake`)
OPTIONS = (
    "url",
    "metadata_server",
    "protocol",
    "device_name",
    "local_hostname",
    "global_segment_size",
    "local_buffer_size",
    "replicas",
    "key_prefix",
    "max_batch",
    *REMOTE_OPTIONS,
)
DEFAULT_PORT = 50051
# Return codes of the 0.3.13 client seen on this machine kind: a key not stored, a stored object larger than the
# buffers given, a transfer that failed (server gone, or an object smaller than the buffers), the master unreachable.
OBJECT_NOT_FOUND = -704
BUFFER_TOO_SMALL = -600
TRANSFER_FAIL = -800
RPC_FAIL = -900
# Chunks per batched call; each pool thread owns this many 128-byte header slots of the registered arena.
DEFAULT_MAX_BATCH = 64


def parse_options(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked options of a mooncake tier spec; nothing is connected."""
    from kvport.cache.config import coerce_positive_int, parse_bytes

    opts = options_from(spec, OPTIONS, where)
    url = opts.get("url")
    if not isinstance(url, str) or not url.startswith("mooncake://"):
        raise UserError(f"{where}: 'url' is required: mooncake://MASTER_HOST:{DEFAULT_PORT}")
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise UserError(f"{where}: url {redact_url(url)!r}: {exc}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.username or parts.password:
        shown = redact_url(url)
        raise UserError(f"{where}: url {shown!r}: expected mooncake://MASTER_HOST:PORT (nothing after the port)")
    out: dict[str, Any] = {"url": f"mooncake://{parts.hostname}:{port}", **parse_remote_options(opts, where)}
    out["master"] = f"{parts.hostname}:{port}"
    out["metadata_server"] = str(opts.get("metadata_server", "P2PHANDSHAKE"))
    out["protocol"] = str(opts.get("protocol", "tcp"))
    out["device_name"] = str(opts.get("device_name", ""))
    out["local_hostname"] = str(opts.get("local_hostname", "auto"))
    out["global_segment_size"] = parse_bytes(opts.get("global_segment_size", 0), f"{where}: global_segment_size")
    out["local_buffer_size"] = parse_bytes(opts.get("local_buffer_size", "16MiB"), f"{where}: local_buffer_size")
    out["replicas"] = coerce_positive_int(opts.get("replicas", 1), f"{where}: replicas")
    out["key_prefix"] = str(opts.get("key_prefix", "kvport:"))
    out["max_batch"] = coerce_positive_int(opts.get("max_batch", DEFAULT_MAX_BATCH), f"{where}: max_batch")
    _require_client(where)
    return out


def _require_client(where: str):
    try:
        from mooncake import store
    except ImportError as exc:
        raise UserError(
            f"{where}: the mooncake tier needs Mooncake's client ({exc}): pip install 'kvport[mooncake]' "
            "(on Debian also: apt-get install libibverbs1 libnuma1 libcurl4 liburing2)"
        ) from None
    return store


class MooncakeTier(RemoteTier):
    """Chunks as ``<key_prefix><chunk key>`` objects in a Mooncake Store. By default this client lends the store no
    memory (``global_segment_size: 0``): the store's own nodes (``mooncake_client``) hold the data, so chunks outlive
    any engine process."""

    kind = "mooncake"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str, metrics: CacheMetrics | None = None) -> MooncakeTier:
        return cls(metrics=metrics, where=where, **parse_options(spec, where))

    def __init__(
        self,
        url: str,
        master: str,
        *,
        timeout_s: float,
        retry_s: float,
        threads: int = 2,
        metadata_server: str = "P2PHANDSHAKE",
        protocol: str = "tcp",
        device_name: str = "",
        local_hostname: str = "auto",
        global_segment_size: int = 0,
        local_buffer_size: int = 16 << 20,
        replicas: int = 1,
        key_prefix: str = "kvport:",
        max_batch: int = DEFAULT_MAX_BATCH,
        metrics: CacheMetrics | None = None,
        where: str = "mooncake tier",
    ) -> None:
        import torch

        self._client = _require_client(where)
        super().__init__(url, timeout_s, retry_s, threads, metrics)
        self.master = master
        self.metadata_server = metadata_server
        self.protocol = protocol
        self.device_name = device_name
        self.local_hostname = local_hostname
        self.global_segment_size = global_segment_size
        self.local_buffer_size = local_buffer_size
        self.replicas = replicas
        self.prefix = key_prefix
        self.max_batch = max_batch
        self._store = None
        self._config = None
        self._memories: list[torch.Tensor] = []
        self._registered: list[tuple[int, int]] = []  # (start, end) of memory registered with the current client
        self._reg_lock = threading.Lock()
        # Header slots: one region of max_batch slots per pool thread, handed out per call.
        self._arena = torch.zeros(threads * max_batch * HEADER_BYTES, dtype=torch.uint8)
        self._regions: queue.SimpleQueue[int] = queue.SimpleQueue()
        for region in range(threads):
            self._regions.put(region)
        self.start()

    def describe(self) -> str:
        return f"{super().describe()} [{self.metadata_server}, {self.protocol}]"

    @property
    def client(self):
        """The underlying MooncakeDistributedStore once connected (the benchmark's raw reference runs on it)."""
        return self._store

    # ---- connection and memory -------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._store is not None:  # the client reconnects to a restarted master itself: ask it a question
            if self._store.batch_is_exist([self.prefix + "probe"])[0] < 0:
                raise TierDown(f"master {self.master} does not answer")
            return
        host, _, port = self.master.rpartition(":")
        try:  # a master that is not there makes setup() block for ~90 s (measured): knock first
            socket.create_connection((host, int(port)), timeout=self.timeout_s).close()
        except OSError as exc:
            raise TierDown(f"master {self.master}: {exc.strerror or exc}") from None
        local = _route_address(host, int(port)) if self.local_hostname == "auto" else self.local_hostname
        store = self._client.MooncakeDistributedStore()
        rc = store.setup(
            local,
            self.metadata_server,
            self.global_segment_size,
            self.local_buffer_size,
            self.protocol,
            self.device_name,
            self.master,
        )
        if rc != 0:
            raise TierDown(f"setup with master {self.master}, metadata {self.metadata_server} returned {rc}")
        config = self._client.ReplicateConfig()
        config.replica_num = self.replicas
        with self._reg_lock:
            self._store, self._config = store, config
            for memory in (self._arena, *self._memories):
                self._register_locked(memory)

    def register_memory(self, memory: torch.Tensor) -> None:
        with self._reg_lock:
            self._memories.append(memory)
            if self._store is not None:
                self._register_locked(memory)

    def _register_locked(self, memory: torch.Tensor) -> None:
        start, size = memory.data_ptr(), memory.numel() * memory.element_size()
        rc = self._store.register_buffer(start, size)
        if rc != 0:
            raise TierDown(f"registering {size} bytes of host memory with the store failed ({rc})")
        self._registered.append((start, start + size))

    def _covered(self, tensor: torch.Tensor) -> bool:
        start = tensor.data_ptr()
        end = start + tensor.numel()
        return any(lo <= start and end <= hi for lo, hi in self._registered)

    def _pieces(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Buffers outside registered memory (not L1: e.g. a scratch chunk) are registered for this call only."""
        extra = [t for t in tensors if not self._covered(t)]
        for tensor in extra:
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError("tier buffers must be contiguous CPU tensors")
            rc = self._store.register_buffer(tensor.data_ptr(), tensor.numel())
            if rc != 0:
                raise RuntimeError(f"registering a {tensor.numel()}-byte buffer failed ({rc})")
        if extra and self.metrics is not None:
            self.metrics.inc("skipped", len(extra), tier=self.kind, reason="unregistered_buffer")
        return extra

    def _unregister(self, extra: list[torch.Tensor]) -> None:
        for tensor in extra:
            self._store.unregister_buffer(tensor.data_ptr())

    # ---- hooks -----------------------------------------------------------------------------------------------------
    def _exists(self, keys: Sequence[str]) -> list[bool]:
        codes = self._store.batch_is_exist([self.prefix + k for k in keys])
        if codes and all(c < 0 for c in codes):
            raise TierDown(f"lookup failed ({codes[0]}): master {self.master} unreachable")
        return [c == 1 for c in codes]

    def _read(self, keys, fingerprint, dsts) -> list[ReadResult]:
        return self._in_batches(self._read_part, keys, fingerprint, dsts)

    def _in_batches(self, part, keys, fingerprint, bufs) -> list:
        """``part(region, keys, fingerprint, bufs)`` over slices of at most ``max_batch`` keys, holding one staging
        region for all of them."""
        out: list = []
        region = self._regions.get()
        try:
            for start in range(0, len(keys), self.max_batch):
                end = start + self.max_batch
                out.extend(part(region, keys[start:end], fingerprint, bufs[start:end]))
        finally:
            self._regions.put(region)
        return out

    def _read_part(self, region: int, keys, fingerprint, dsts) -> list[ReadResult]:
        headers = self._headers(region, len(keys))
        extra = self._pieces(dsts)
        try:
            codes = self._store.batch_get_into_multi_buffers(
                [self.prefix + k for k in keys],
                [[h.data_ptr(), d.data_ptr()] for h, d in zip(headers, dsts)],
                [[HEADER_BYTES, d.numel()] for d in dsts],
            )
        finally:
            self._unregister(extra)
        if codes and all(c == RPC_FAIL for c in codes):
            raise TierDown(f"read failed ({RPC_FAIL}): master {self.master} unreachable")
        results = [self._judge(k, fingerprint, h, d, c) for k, h, d, c in zip(keys, headers, dsts, codes)]
        bad = [self.prefix + k for k, r in zip(keys, results) if r in (ReadResult.CORRUPT, ReadResult.TRUNCATED)]
        if bad:  # force: the read just took a lease on it; a bad object must go now, not in 10 s
            self._store.batch_remove(bad, force=True)
        return results

    def _judge(self, key: str, fingerprint: str, header: torch.Tensor, dst: torch.Tensor, code: int) -> ReadResult:
        expected = HEADER_BYTES + dst.numel()
        if code == OBJECT_NOT_FOUND:
            return ReadResult.MISS
        if code == BUFFER_TOO_SMALL:
            return ReadResult.CORRUPT  # larger than a chunk of this layout: not ours
        if code == TRANSFER_FAIL:
            size = self._store.get_size(self.prefix + key)  # a short object and a lost node both fail the transfer
            if 0 <= size < expected:
                return ReadResult.TRUNCATED
            return ReadResult.IO_ERROR
        if code != expected:
            return ReadResult.IO_ERROR if code < 0 else ReadResult.CORRUPT
        parsed = open_header(bytes(header.numpy()), key, fingerprint)
        if not isinstance(parsed, Header):
            return parsed
        if parsed.payload_len != dst.numel():
            return ReadResult.CORRUPT
        if checksum(memoryview(dst.numpy())) != parsed.checksum:  # the payload, verified where it landed
            return ReadResult.CORRUPT
        return ReadResult.HIT

    def _write(self, keys, fingerprint, srcs) -> list[bool | None]:
        return self._in_batches(self._write_part, keys, fingerprint, srcs)

    def _write_part(self, region: int, keys, fingerprint, srcs) -> list[bool | None]:
        headers = self._headers(region, len(keys))
        for key, header, src in zip(keys, headers, srcs):
            header.numpy()[:] = memoryview(seal_header(key, fingerprint, memoryview(src.numpy())))
        extra = self._pieces(srcs)
        try:
            codes = self._store.batch_put_from_multi_buffers(
                [self.prefix + k for k in keys],
                [[h.data_ptr(), s.data_ptr()] for h, s in zip(headers, srcs)],
                [[HEADER_BYTES, s.numel()] for s in srcs],
                self._config,
            )
        finally:
            self._unregister(extra)
        if codes and all(c == RPC_FAIL for c in codes):
            raise TierDown(f"store failed ({RPC_FAIL}): master {self.master} unreachable")
        # 0: stored, or already present (a put of an existing key keeps the stored object); negative: not stored
        # (no space left in the store's segments, or a transfer error).
        return [code == 0 for code in codes]

    def _headers(self, region: int, count: int) -> list[torch.Tensor]:
        base = region * self.max_batch * HEADER_BYTES
        return [self._arena[base + i * HEADER_BYTES : base + (i + 1) * HEADER_BYTES] for i in range(count)]

    def _remove(self, keys: Sequence[str]) -> None:
        self._store.batch_remove([self.prefix + k for k in keys], force=True)

    def _close_client(self) -> None:
        if self._store is not None:
            self._store.close()


def _route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (a UDP connect sends nothing): what the store's other nodes
    use to reach this client. Loopback when the master is on this machine."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return probe.getsockname()[0]
    except OSError as exc:
        raise TierDown(f"no route to master {host}:{port} ({exc.strerror or exc})") from None
