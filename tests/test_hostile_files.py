"""Property test: mutated catalog layouts and cache configs (alias bombs, deep nesting, huge and non-finite numbers,
wrong types, other encodings, truncation) through the real CLI, bounded: exit 0 or one stderr line and exit 2,
under a second of CPU, in 256 MiB of address space. Layout mutants that `check` accepts must also `show`."""

from __future__ import annotations

import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvport.layouts.loader import SPECS_DIR

CATALOG = sorted(SPECS_DIR.glob("*.yaml"))
CONFIG = {
    "cache": {
        "chunk_tokens": 256,
        "l1_bytes": "64MiB",
        "l2_path": "L2_PATH",
        "l2_bytes": "1GiB",
        "l2_fsync": False,
        "salt": "tenant",
        "backend": "torch",
        "io_threads": 2,
        "max_pending_stores": 16,
        "metrics_port": None,
    }
}
MEMORY = 256 << 20  # the CLI for these needs ~30 MB (no torch); MemoryError here would be a traceback, caught below
PLACEHOLDER = "HOSTILE_VALUE_3141"


def _bomb(levels: int, width: int) -> str:
    parts = ["&b0 [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


# Flow-style YAML that replaces one value: what the probes of issue 16 used, and their neighbours.
NUMBERS = [0, -1, 1, 2, 3, 16, 1000, 10**6, 10**8, 10**9, 2**31, 10**18, 2**63 - 1, 2**63, -(2**63) - 1, 10**30]
FRAGMENTS = [str(n) for n in NUMBERS] + [
    ".nan", ".inf", "-.inf", "1.5", "1.0e+30", "1.0e+308", "0x7fffffffffffffff", "0b" + "1" * 80, "1" + ":59" * 30,
    "٣", "'٣٢'", "2024-13-45", "0b_",
    "[]", "{}", "null", "true", "''", "[1, 2]", "{a: 1}", "{elements: 1}", "{bytes: 7}",
    "'$layers * $layers * $layers * $layers * $layers * $layers * $layers'", "'$" + "x" * 300 + "'",
    "'$layers" + " + 1" * 300 + "'", "'" + "(" * 300 + "$layers" + ")" * 300 + "'", "'$nope'", "'$layers // 0'",
    "[" * 40 + "]" * 40, "[" * 3000 + "]" * 3000, "&r [*r]", _bomb(9, 9), _bomb(4, 9),
    "'" + "x" * 70000 + "'",
]  # fmt: skip


def _paths(node, prefix=()):
    """Every value's key path in a parsed document (mapping keys and list indices)."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _replace(doc, path, value):
    if not path:
        return value
    if isinstance(doc, dict):
        doc = dict(doc)
    else:
        doc = list(doc)
    doc[path[0]] = _replace(doc[path[0]], path[1:], value)
    return doc


@st.composite
def mutants(draw, documents: list[object]) -> bytes:
    """One mutated file: a value replaced by a hostile fragment, and/or damage to the text or its encoding."""
    doc = draw(st.sampled_from(documents))
    paths = list(_paths(doc))
    path = draw(st.sampled_from(paths))
    fragment = draw(st.sampled_from(FRAGMENTS) | st.integers(-(2**70), 2**70).map(str))
    text = yaml.safe_dump(_replace(doc, path, PLACEHOLDER), sort_keys=False, allow_unicode=True, width=10**6)
    if draw(st.booleans()):
        text = text.replace(PLACEHOLDER, fragment, 1)
    else:
        text = text.replace(PLACEHOLDER, str(draw(st.sampled_from(NUMBERS))), 1)
    lines = text.splitlines(keepends=True)
    damage = draw(st.sampled_from(["none", "truncate", "duplicate-line", "insert-bytes", "encoding", "indent"]))
    data = text.encode()
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "duplicate-line" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        data = "".join(lines[: i + 1] + lines[i:]).encode()
    elif damage == "insert-bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    elif damage == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]))
        data = (text + "# é\n").encode(codec, errors="replace")
    elif damage == "indent" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        data = "".join(lines[:i] + ["   " + lines[i]] + lines[i + 1 :]).encode()
    return data


def _check_bounded(run, label: str) -> str:
    assert not run.timed_out, run
    assert run.returncode in (0, 2), run
    assert run.cpu_s < 1.0, run
    assert "Traceback" not in run.stderr, run
    if run.returncode == 2:
        line = run.one_line_error()
        assert label in line, run  # names the file
        return line
    assert run.stderr == "", run
    return ""


LAYOUT_DOCS = [yaml.safe_load(p.read_text()) for p in CATALOG]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutants(LAYOUT_DOCS))
def test_mutated_layouts_are_checked_in_one_line(tmp_path, bounded_kvport, data):
    path = tmp_path / "mutant.yaml"
    path.write_bytes(data)
    run = bounded_kvport(["layout", "check", str(path)], memory_bytes=MEMORY, timeout_s=10)
    if not _check_bounded(run, str(path)):
        assert re.fullmatch(rf"ok  {re.escape(str(path))}: .*\n", run.stdout), run
        shown = bounded_kvport(["layout", "show", str(path)], memory_bytes=MEMORY, timeout_s=10)
        assert shown.returncode == 0 and shown.stderr == "" and shown.cpu_s < 1.0, shown


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutants([CONFIG, CONFIG["cache"]]))
def test_mutated_configs_are_checked_in_one_line(tmp_path, bounded_kvport, data):
    path = tmp_path / "kv.yaml"
    path.write_bytes(data.replace(b"L2_PATH", str(tmp_path / "l2").encode()))
    run = bounded_kvport(["config", "check", str(path)], memory_bytes=MEMORY, timeout_s=10)
    if not _check_bounded(run, f"cache config {path}"):
        assert run.stdout.startswith("chunk_tokens "), run


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda f: f[:24])
@pytest.mark.parametrize("dim", ["layers", "dtype"])
def test_every_fragment_in_a_layout_dim(tmp_path, bounded_kvport, fragment, dim):
    # The deterministic half: each fragment as a dim of vllm-flash-nhd.yaml. `layers` is where issue 16's worst cases
    # were (10**8 layers: 17 s, 3.9 GB; 10**9: MemoryError; 2**63: OverflowError); an alias bomb as `dtype` hung
    # while its message printed the expanded value.
    doc = yaml.safe_load((SPECS_DIR / "vllm-flash-nhd.yaml").read_text())
    doc["dims"][dim] = PLACEHOLDER
    path = tmp_path / "dims.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=10**6).replace(PLACEHOLDER, fragment, 1))
    run = bounded_kvport(["layout", "check", str(path)], memory_bytes=MEMORY, timeout_s=10)
    if not _check_bounded(run, str(path)):
        shown = bounded_kvport(["layout", "show", str(path)], memory_bytes=MEMORY, timeout_s=10)
        assert shown.returncode == 0 and shown.cpu_s < 1.0, shown
