"""kvport.yamlio: every file or document it refuses is one UserError line naming the file (and the line), at once."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from kvport.errors import UserError
from kvport.layouts.loader import SPECS_DIR
from kvport.yamlio import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml, parse_yaml


def _bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs document: each level an anchored list of `width` aliases of the level below."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _refused(text: str) -> str:
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        parse_yaml(text, "f.yaml")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "\n" not in message and message.startswith("f.yaml: ")
    return message


INT64 = "does not fit in 64 bits (-2**63 .. 2**63-1)"
HOSTILE = {
    "alias-bomb": (_bomb(), 5, f"more than {MAX_NODES} values once aliases are expanded"),
    "deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", 1, f"nested deeper than {MAX_DEPTH} levels"),
    "recursive": ("a: &a [1, *a]\n", 1, "an alias refers to a node that contains it (recursive structure)"),
    "duplicate": ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first at line 1)"),
    "2**63": ("a: 9223372036854775808\n", 1, f"integer 9223372036854775808 {INT64}"),
    "-2**63-1": ("a: -9223372036854775809\n", 1, f"integer -9223372036854775809 {INT64}"),
    "long-hex": ("a: 0x" + "f" * 5000 + "\n", 1, "integer 0x" + "f" * 38 + "... is too long for 64 bits"),
    "sexagesimal": ("a: 1" + ":59" * 40 + "\n", 1, "integer 1" + ":59" * 13 + "... is too long for 64 bits"),
    "nan": ("a: .nan\n", 1, ".nan is not a finite number"),
    "inf": ("a:\n  b: -.inf\n", 2, "-.inf is not a finite number"),
    "bad-date": ("a: 2024-13-45\n", 1, "'2024-13-45': month must be in 1..12"),
    "bad-binary-int": ("a: 0b_\n", 1, "'0b_': invalid literal for int() with base 2: ''"),
    "control-char": ("a: b\nc: \x01\n", 2, "unacceptable character #x0001"),
    "two-documents": ("a: 1\n---\nb: 2\n", 2, "but found another document"),
}


@pytest.mark.parametrize(("text", "line", "problem"), HOSTILE.values(), ids=HOSTILE)
def test_hostile_documents_are_one_line(text, line, problem):
    assert _refused(text) == f"f.yaml: invalid YAML at line {line}: {problem}"


def test_a_document_over_the_size_limit_is_refused_before_parsing():
    assert _refused("x" * (MAX_BYTES + 1)) == f"f.yaml: larger than {MAX_BYTES} characters, the limit for a YAML file"


def test_what_is_valid_reads_as_pyyaml_reads_it():
    # Merges, aliases within the limits, int64 extremes, finite floats, non-ASCII digits (a string: YAML has no such
    # number) and the empty document.
    text = "base: &b {x: 1, y: [2, 3]}\nc:\n  <<: *b\n  x: 9223372036854775807\nd: -9223372036854775808\n"
    text += "e: 1.5e+300\nf: ٣\ng: [*b, *b]\n"
    assert parse_yaml(text, "f.yaml") == yaml.safe_load(text)
    assert parse_yaml("", "f.yaml") is None
    assert parse_yaml(_bomb(levels=3), "f.yaml") == yaml.safe_load(_bomb(levels=3))  # 9**3 values: within limits


def test_every_catalog_file_reads_as_pyyaml_reads_it():
    for path in sorted(SPECS_DIR.glob("*.yaml")):
        assert load_yaml(path) == yaml.safe_load(path.read_text()), path.name


def test_depth_limit_counts_through_aliases():
    inner = "[" * 20 + "1" + "]" * 20
    text = f"a: &a {inner}\nb: [[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]\n"  # 1 + 16 + 21: deeper than 32 expanded
    assert parse_yaml(f"a: &a {inner}\nb: [*a]\n", "f.yaml")["b"][0] == yaml.safe_load(inner)  # 23 deep: fine
    # The line is the anchored subtree's (the composer keeps no node for an alias).
    assert _refused(text) == f"f.yaml: invalid YAML at line 1: nested deeper than {MAX_DEPTH} levels (aliases expanded)"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: os.mkfifo(p), "a FIFO, expected a regular file"),
        (lambda p: p.mkdir(), "a directory, expected a regular file"),
        (lambda p: p.write_bytes("name: x\n".encode("utf-16")), "UTF-16 text (byte-order mark), expected UTF-8"),
        (lambda p: p.write_bytes("name: x\n".encode("utf-32")), "UTF-32 text (byte-order mark), expected UTF-8"),
        (
            lambda p: p.write_bytes("name: x\n".encode("utf-16-le")),  # no BOM: NULs between the ASCII bytes
            "binary or UTF-16/32 content (NUL byte at 1), expected UTF-8 text",
        ),
        (lambda p: p.write_bytes(b"name: t\xff\n"), "not UTF-8 text (byte 7)"),
        (lambda p: p.write_bytes(b"a: 1\n" * (MAX_BYTES // 5 + 1)), f"larger than {MAX_BYTES} bytes, the limit"),
        (lambda p: None, "No such file or directory"),
    ],
    ids=["fifo", "directory", "utf-16", "utf-32", "utf-16-no-bom", "latin-1", "too-large", "missing"],
)  # fmt: skip
def test_files_that_are_not_utf8_text_are_refused_at_once(tmp_path, make, reason):
    path = tmp_path / "f.yaml"
    make(path)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_yaml(path, "f.yaml")
    assert time.perf_counter() - start < 1.0  # a FIFO without a writer used to block forever
    assert str(err.value).startswith(f"f.yaml: cannot read: {reason}")


def test_a_character_device_is_refused_without_reading_it():
    with pytest.raises(UserError) as err:
        load_yaml("/dev/zero")
    assert str(err.value) == "/dev/zero: cannot read: a character device, expected a regular file"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: x\n")
    assert load_yaml(path) == {"name": "x"}
