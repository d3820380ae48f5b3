"""Tests for kvport.cache.config: defaults, YAML/env/override precedence, unknown keys and bad values."""

from __future__ import annotations

import pytest

from kvport.cache.config import CacheConfig, load_config, parse_bytes
from kvport.errors import UserError


def test_defaults_without_sources():
    cfg = load_config(environ={})
    assert cfg == CacheConfig()
    assert cfg.chunk_tokens == 256 and cfg.l2_path is None and cfg.async_store and cfg.prefetch


def test_yaml_env_and_overrides_precedence(tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text("chunk_tokens: 128\nl1_bytes: 64MiB\nl2_path: /tmp/x\nsalt: file\n")
    env = {"KVPORT_SALT": "env", "KVPORT_ASYNC_STORE": "false", "KVPORT_PLATFORM": "cpu"}
    cfg = load_config(path, overrides={"l2_path": None}, environ=env)
    assert cfg.chunk_tokens == 128
    assert cfg.l1_bytes == 64 << 20
    assert cfg.salt == "env"  # env beats file
    assert cfg.async_store is False
    assert cfg.l2_path is None  # override beats file


def test_nested_cache_section_and_config_env(tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text("cache:\n  l2_bytes: 2GB\n")
    assert load_config(environ={"KVPORT_CONFIG": str(path)}).l2_bytes == 2 * 10**9
    path.write_text("cache:\n  l2_bytes: 2GB\nchunk_tokns: 128\n")  # a setting left outside the section
    with pytest.raises(UserError, match=r"kv\.yaml: keys beside the 'cache' section \(chunk_tokns\)"):
        load_config(path, environ={})


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text("chunk_tokns: 128\n")
    with pytest.raises(UserError, match=r"kv\.yaml.*unknown key 'chunk_tokns'"):
        load_config(path, environ={})


def test_unknown_override_key():
    with pytest.raises(UserError, match="unknown key 'l3_path'"):
        load_config(overrides={"l3_path": "x"}, environ={})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("l1_bytes", "lots", "l1_bytes.*not a byte count"),
        ("async_store", "maybe", "async_store.*not a boolean"),
        ("chunk_tokens", "1.5", "chunk_tokens.*not an integer"),
        ("chunk_tokens", 0, "chunk_tokens=0"),
        ("chunk_tokens", None, "null is not allowed"),
        ("metrics_port", 70000, "metrics_port"),
    ],
)
def test_bad_values_are_user_errors(key, value, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides={key: value}, environ={})


def test_bad_env_value_names_variable():
    with pytest.raises(UserError, match="KVPORT_L2_BYTES"):
        load_config(environ={"KVPORT_L2_BYTES": "12 parsecs"})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_tokens: [1,\n")
    with pytest.raises(UserError, match=r"bad\.yaml: invalid YAML at line 2: "):
        load_config(bad, environ={})
    with pytest.raises(UserError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(listy, environ={})


def test_parse_bytes_units():
    assert parse_bytes("1GiB", "x") == 1 << 30
    assert parse_bytes("1.5 MB", "x") == 1_500_000
    assert parse_bytes(4096, "x") == 4096
    with pytest.raises(UserError):
        parse_bytes(True, "x")
