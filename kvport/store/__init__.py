"""Bytes at rest, with no device and no engine: chunk keys, the envelope, the L1 host pool, the tiers and the chunk
store's lookup/admit/fetch policy. Must not import torch at import time or know about descriptors and backends."""
