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


def _from_file(tmp_path, text: str):
    path = tmp_path / "kv.yaml"
    path.write_text(text)
    return load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("l1_bytes: 1.5\n", "l1_bytes: 1.5 is not a whole number of bytes"),  # was truncated to 1 byte
        ("l1_bytes: '1.5'\n", "l1_bytes: '1.5' is not a whole number of bytes"),
        ("l1_bytes: 0.1KiB\n", "l1_bytes: '0.1KiB' is not a whole number of bytes"),
        ("l1_bytes: 1e30\n", "l1_bytes: '1e30' is not a byte count (expected e.g. 1073741824 or '1GiB')"),
        ("l1_bytes: 1.0e+30\n", "l1_bytes: 1e+30 is more than 2**63-1 bytes"),
        ("l1_bytes: 10000000000000000000EB\n", "is not a byte count"),
        (f"l1_bytes: {10**30}\n", f"integer {10**30} does not fit in 64 bits"),
        ("l1_bytes: .inf\n", "invalid YAML at line 1: .inf is not a finite number"),
        ("chunk_tokens: ٣\n", "chunk_tokens: '٣' is not an integer"),  # Arabic-Indic 3 was read as 3
        ("chunk_tokens: '1_000'\n", "chunk_tokens: '1_000' is not an integer"),
        ("chunk_tokens: 256\nsalt: a\nchunk_tokens: 512\n", "invalid YAML at line 3: duplicate key 'chunk_tokens'"),
        ("backend: nonexistent\n", "backend: unknown backend 'nonexistent' (known: torch, triton, cuda, hip)"),
    ],
)  # fmt: skip
def test_values_a_machine_cannot_hold_are_refused_at_load(tmp_path, text, message):
    with pytest.raises(UserError) as err:
        _from_file(tmp_path, text)
    assert str(err.value).startswith(f"cache config {tmp_path / 'kv.yaml'}: ")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_exact_byte_counts_with_fractions_of_a_unit():
    assert parse_bytes("1.1 GB", "x") == 1_100_000_000  # float(1.1) * 1e9 is 1100000000.0000002
    assert parse_bytes("0.5KiB", "x") == 512
    assert parse_bytes(4096.0, "x") == 4096
    assert parse_bytes((1 << 63) - 1, "x") == (1 << 63) - 1
    with pytest.raises(UserError, match="more than 2\\*\\*63-1 bytes"):
        parse_bytes(1 << 63, "x")


def test_l2_path_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _from_file(tmp_path, "l2_path: ~/kv\n").l2_path == str(tmp_path / "home" / "kv")
    assert load_config(environ={"KVPORT_L2_PATH": "~/env"}).l2_path == str(tmp_path / "home" / "env")


def test_known_backend_is_accepted():
    assert load_config(overrides={"backend": "torch"}, environ={}).backend == "torch"
    assert load_config(overrides={"backend": None}, environ={}).backend is None


def test_machine_limits_refuse_l1_beyond_memory_and_l2_beyond_the_filesystem(tmp_path):
    from kvport.cache.config import check_machine_limits
    from kvport.machine import disk_space, total_memory

    total = total_memory()
    for l1 in ("1000TiB", total + 1):  # 64GiB on a machine with less: the same rule
        cfg = load_config(overrides={"l1_bytes": l1}, environ={})
        with pytest.raises(UserError, match=r"^cache config: l1_bytes=.* is more than this machine's memory \("):
            check_machine_limits(cfg)
    fs = disk_space(tmp_path).total
    cfg = load_config(overrides={"l2_path": str(tmp_path / "new" / "kv"), "l2_bytes": fs + 1}, environ={})
    with pytest.raises(UserError, match=r"^cache config: l2_bytes=.* is more than the filesystem of l2_path .*/new/kv"):
        check_machine_limits(cfg)
    check_machine_limits(load_config(overrides={"l2_path": str(tmp_path), "l2_bytes": fs}, environ={}))
    check_machine_limits(load_config(overrides={"l1_bytes": "64MiB"}, environ={}))


def test_a_range_error_names_where_the_value_came_from(tmp_path):
    with pytest.raises(UserError) as err:
        _from_file(tmp_path, "chunk_tokens: 0\n")
    assert str(err.value) == f"cache config {tmp_path / 'kv.yaml'}: chunk_tokens=0, expected a positive integer"
    (tmp_path / "kv.yaml").write_text("io_threads: 4\n")
    with pytest.raises(UserError) as err:
        load_config(tmp_path / "kv.yaml", environ={"KVPORT_IO_THREADS": "0"})  # the env wins, and is named
    assert str(err.value) == "KVPORT_IO_THREADS: io_threads=0, expected at least 1"
