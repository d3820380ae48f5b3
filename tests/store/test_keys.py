"""Tests for kvport.store.keys: hash-chain properties, isolation by namespace/salt, stability across processes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvport.store.keys import chunk_keys, iter_chunk_keys

C = 16


def test_one_key_per_full_chunk_only():
    assert len(chunk_keys(list(range(C * 3 - 1)), C, "m")) == 2
    assert len(chunk_keys(list(range(C * 3)), C, "m")) == 3
    assert chunk_keys(list(range(C - 1)), C, "m") == []


def test_same_prefix_same_keys():
    a = list(range(C * 4))
    b = a[: C * 2] + [7] * (C * 2)
    ka, kb = chunk_keys(a, C, "m"), chunk_keys(b, C, "m")
    assert ka[:2] == kb[:2]
    assert ka[2] != kb[2] and ka[3] != kb[3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=C * 4, max_size=C * 4), st.integers(0, C * 4 - 1))
def test_any_token_change_changes_keys_from_there_on(tokens, pos):
    changed = list(tokens)
    changed[pos] = tokens[pos] + 1
    ka, kb = chunk_keys(tokens, C, "m"), chunk_keys(changed, C, "m")
    first = pos // C
    assert ka[:first] == kb[:first]
    assert all(x != y for x, y in zip(ka[first:], kb[first:]))


def test_namespace_and_salt_isolate_every_key():
    tokens = list(range(C * 3))
    base = chunk_keys(tokens, C, "llama|bf16|fp:abc|tp0/2")
    for other in (
        chunk_keys(tokens, C, "llama|bf16|fp:abc|tp1/2"),  # another rank
        chunk_keys(tokens, C, "mistral|bf16|fp:abc|tp0/2"),  # another model
        chunk_keys(tokens, C, "llama|bf16|fp:abc|tp0/2", salt="tenant-b"),  # another tenant
    ):
        assert not set(base) & set(other)
    # length-prefixing: moving characters between namespace and salt gives other keys
    assert chunk_keys(tokens, C, "ab", salt="c") != chunk_keys(tokens, C, "a", salt="bc")


def test_request_extra_isolates_every_key():
    """The per-request extra (LoRA, cache_salt, ... digests from the adapter) roots its own chain."""
    tokens = list(range(C * 3))
    plain = chunk_keys(tokens, C, "m")
    assert chunk_keys(tokens, C, "m", extra=b"") == plain
    lora = chunk_keys(tokens, C, "m", extra=b"lora-a")
    assert not set(plain) & set(lora)
    assert not set(lora) & set(chunk_keys(tokens, C, "m", extra=b"lora-b"))
    # moving bytes between salt and extra, or namespace and extra, gives other keys
    assert chunk_keys(tokens, C, "m", salt="a", extra=b"b") != chunk_keys(tokens, C, "m", salt="ab", extra=b"")
    assert chunk_keys(tokens, C, "ma", extra=b"b") != chunk_keys(tokens, C, "m", extra=b"ab")


def test_container_types_agree():
    ref = chunk_keys(list(range(C * 2)), C, "m")
    assert chunk_keys(torch.arange(C * 2), C, "m") == ref
    assert chunk_keys(torch.arange(C * 2, dtype=torch.int32), C, "m") == ref
    assert chunk_keys(np.arange(C * 2), C, "m") == ref
    assert chunk_keys(tuple(range(C * 2)), C, "m") == ref


def test_keys_are_stable_across_processes_and_hash_seeds():
    code = "from kvport.store.keys import chunk_keys; print(chunk_keys(list(range(64)), 16, 'ns', 's')[-1])"
    outs = set()
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PYTHONPATH": "."}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        outs.add(out.stdout.strip())
    assert outs == {chunk_keys(list(range(64)), 16, "ns", "s")[-1]}


def test_iter_chunk_keys_derives_a_key_only_when_asked():
    tokens = list(range(C)) + [None] * C  # the second chunk cannot be converted: it must not be touched
    assert next(iter_chunk_keys(tokens, C, "m")) == chunk_keys(tokens[:C], C, "m")[0]
    assert list(iter_chunk_keys(list(range(C * 3 + 1)), C, "m")) == chunk_keys(list(range(C * 3 + 1)), C, "m")
