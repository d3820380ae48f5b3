"""kvport: moves LLM inference KV caches between engine memory, pinned host memory, disk and shared stores.
Importing kvport is cheap and side-effect free: no torch import, no device query, no environment change."""

__version__ = "0.1.0"
