"""The CPU platform: engine memory in host RAM, copies finish before they return, no pinned memory.
Owns nothing beyond the synchronous defaults of base.Platform; must not pretend to have streams."""

from __future__ import annotations

from kvport.hal.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"
