"""The interface every copy backend implements (torch, triton, cuda, hip) and the verdict type they answer with.
Owns only the contract; must not import any backend or kernel module."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvport.hal.completion import Completion
    from kvport.hal.platform import PlatformInfo
    from kvport.layouts.descriptor import CopyDescriptor


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A yes/no answer that always carries its reason, so nothing is ever rejected silently."""

    ok: bool
    reason: str

    @classmethod
    def yes(cls, reason: str = "ok") -> Verdict:
        return cls(True, reason)

    @classmethod
    def no(cls, reason: str) -> Verdict:
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok


class Backend(abc.ABC):
    """Moves KV between engine memory (described by a CopyDescriptor) and canonical chunks.

    ``available`` must be cheap and must not create a device context: it is called by ``kvport doctor``.

    ``gather`` and ``scatter`` issue their work on the engine device's current stream, ordered after whatever was
    issued there before, and return a Completion of it (kvport.hal.completion): an event on that stream on
    platforms with streams, done at once where the work is synchronous. Nobody may read a gathered chunk, or reuse
    or free a chunk a scatter reads, before that completion.
    """

    name: str = ""
    # Higher wins when several backends can run: native (cuda/hip) > triton > torch.
    priority: int = 0

    @abc.abstractmethod
    def available(self, platform: PlatformInfo) -> Verdict:
        """Can this backend run on this platform at all, and if not, why."""

    def expected(self, platform: PlatformInfo) -> bool:
        """True when this backend should run here, so that its failure is an error, not a silent step down
        to a slower backend (e.g. a native module built for this platform that does not load)."""
        return False

    def supports(self, descriptor: CopyDescriptor) -> Verdict:
        """Can this backend copy this particular layout. Default: every layout."""
        return Verdict.yes()

    @abc.abstractmethod
    def gather(
        self,
        descriptor: CopyDescriptor,
        block_ids: Sequence,
        dst: torch.Tensor,
        num_tokens: int,
    ) -> Completion:
        """Engine memory -> canonical bytes in ``dst`` (uint8, at least canonical_bytes(num_tokens))."""

    @abc.abstractmethod
    def scatter(
        self,
        src: torch.Tensor,
        descriptor: CopyDescriptor,
        block_ids: Sequence,
        num_tokens: int,
    ) -> Completion:
        """Canonical bytes in ``src`` -> engine memory; bytes outside the addressed slots stay untouched."""
