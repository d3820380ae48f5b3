"""The L2 tier interface: whole-chunk put/get/contains keyed by chunk key, with validation on every read.
Owns the contract only; must not contain storage code or know about L1, engines or copy backends."""

from __future__ import annotations

import abc
import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ReadResult(enum.Enum):
    """Outcome of one chunk read. Anything but HIT leaves the destination's content undefined and unusable."""

    HIT = "hit"
    MISS = "miss"  # no such chunk
    CORRUPT = "corrupt"  # checksum, header or length mismatch; the chunk was deleted
    TRUNCATED = "truncated"  # shorter than its header says; deleted
    WRONG_FINGERPRINT = "wrong_fingerprint"  # stored by another layout; deleted
    IO_ERROR = "io_error"


class L2Tier(abc.ABC):
    """A chunk store. Writes are all-or-nothing: a reader sees a whole, checksummed chunk or nothing.

    ``fingerprint`` is the layout fingerprint of the canonical chunk (CopyDescriptor.fingerprint); a chunk read
    with a different fingerprint than it was written with is never returned.
    """

    name: str = ""

    @abc.abstractmethod
    def contains(self, key: str) -> bool:
        """Cheap existence check (no validation): used by lookups, which loads then confirm."""

    @abc.abstractmethod
    def get_into(self, key: str, fingerprint: str, dst: torch.Tensor) -> ReadResult:
        """Read and validate a chunk of exactly ``dst.numel()`` bytes into ``dst`` (uint8, CPU)."""

    @abc.abstractmethod
    def put(self, key: str, fingerprint: str, src: torch.Tensor) -> bool:
        """Store ``src`` (uint8, CPU) under ``key`` atomically; False when it could not be stored."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove a chunk if present."""

    def close(self) -> None:
        """Release resources; stored chunks stay. Tiers without resources keep this default."""
        return None
