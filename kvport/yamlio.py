"""Bounded YAML reading for user files (layout specs, cache configs): regular UTF-8 files within size, depth and
node limits, no duplicate keys, numbers a machine can hold. Owns those one-line errors; must not interpret documents."""

from __future__ import annotations

import functools
import math
import os
import stat
from pathlib import Path

from kvport.errors import UserError

# Pure-Python PyYAML (the C loader composes recursively in C, out of reach of a depth limit) parsed 650 KB of
# flow mappings in 4.6 s on the 2-core dev VM, ~7 us/byte: 64 KiB parses in under half a second there. The largest
# catalog file (deepseek-v4.yaml) is 1.9 KB, a cache config well under 1 KB.
MAX_BYTES = 64 * 1024
# Nesting, counted through aliases; catalog files nest 5 deep (top, groups, group, planes, plane, width).
MAX_DEPTH = 32
# Nodes after alias expansion: an alias bomb (9 aliases of 9 aliases ...) is a few hundred bytes and 10**9 nodes,
# harmless to parse but not to walk (a validation message once printed one and hung). 64 KiB holds ~20k nodes at most.
MAX_NODES = 10_000
# Integers must fit in int64: tensor shapes, strides and the copy tables' byte offsets are int64 (torch, kernels).
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
# The longest text of an int64 in any YAML 1.1 form is 66 characters ("-0b" + 63 digits); longer is refused before
# int() sees it (sexagesimal "1:2:3:..." is converted digit by digit, a long one is a long loop over growing ints).
_MAX_INT_TEXT = 70
_STAT_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def read_text(path: str | os.PathLike, label: str, error: type[UserError] = UserError) -> str:
    """The UTF-8 text of a regular file of at most MAX_BYTES; anything else (a FIFO, a device, a directory, binary or
    UTF-16 content) is ``error("<label>: cannot read: ...")`` at once, never a blocking read."""
    # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _STAT_KINDS.items() if test(mode)), "not a regular file")
            raise error(f"{label}: cannot read: {kind}, expected a regular file")
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_BYTES:
        raise error(f"{label}: cannot read: larger than {MAX_BYTES} bytes, the limit for a YAML file")
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise error(f"{label}: cannot read: {name} text (byte-order mark), expected UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise error(f"{label}: cannot read: binary or UTF-16/32 content (NUL byte at {nul}), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{label}: cannot read: not UTF-8 text (byte {exc.start})") from None
    return text.removeprefix("\ufeff")


def load_yaml(path: str | os.PathLike, label: str | None = None, error: type[UserError] = UserError) -> object:
    """Read and parse one YAML document within the limits above; every problem is one ``error`` line naming
    ``label`` (default: the path) and, where known, the line."""
    label = str(path) if label is None else label
    return parse_yaml(read_text(Path(path), label, error), label, error)


def parse_yaml(text: str, label: str, error: type[UserError] = UserError) -> object:
    """Parse YAML text (already read) within the limits above; see load_yaml."""
    import yaml  # noqa: PLC0415 - kept out of module import so `kvport --help` stays cheap

    if len(text) > MAX_BYTES:
        raise error(f"{label}: larger than {MAX_BYTES} characters, the limit for a YAML file")
    try:
        loader = _loader_class()(text)  # the reader refuses control characters here, at construction
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expanded(node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "malformed"
        raise error(f"{label}: invalid YAML{where}: {_one_line(problem)}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise error(f"{label}: invalid YAML at line {line}: unacceptable character #x{exc.character:04x}") from None
    except yaml.YAMLError as exc:
        raise error(f"{label}: invalid YAML: {_one_line(str(exc))}") from None
    except RecursionError:  # a limit above should prevent it; never a traceback for a user's file
        raise error(f"{label}: invalid YAML: nested too deeply") from None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Limit(Exception):
    """A limit crossed while walking the composed graph: message and the node's start mark."""

    def __init__(self, message: str, mark) -> None:
        super().__init__(message)
        self.mark = mark


def _check_expanded(root) -> None:
    """Nodes and depth of the document as a consumer sees it (aliases expanded), without expanding it: each node's
    (count, depth) is computed once; a cycle (an alias inside its own anchor) is refused."""
    import yaml  # noqa: PLC0415

    memo: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()

    def walk(node, depth: int) -> tuple[int, int]:
        """(nodes, height) of ``node``'s expanded subtree; ``depth`` is where this occurrence of it sits."""
        key = id(node)
        if key in on_path:
            raise _Limit("an alias refers to a node that contains it (recursive structure)", node.start_mark)
        if depth > MAX_DEPTH:  # checked on the way down too: the walk itself must stay shallow
            raise _Limit(f"nested deeper than {MAX_DEPTH} levels (aliases expanded)", node.start_mark)
        if key not in memo:
            on_path.add(key)
            count, below = 1, 0
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            for child in children:
                c, h = walk(child, depth + 1)
                count, below = count + c, max(below, h)
                if count > MAX_NODES:
                    raise _Limit(f"more than {MAX_NODES} values once aliases are expanded", node.start_mark)
            on_path.discard(key)
            memo[key] = (count, below + 1)
        count, height = memo[key]
        if depth - 1 + height > MAX_DEPTH:  # an alias puts a subtree deeper than where its anchor was
            raise _Limit(f"nested deeper than {MAX_DEPTH} levels (aliases expanded)", node.start_mark)
        return count, height

    try:
        walk(root, 1)
    except _Limit as exc:
        raise yaml.constructor.ConstructorError(None, None, str(exc), exc.mark) from None


@functools.cache
def _loader_class():
    """The SafeLoader subclass with the limits (built on first use: yaml is imported lazily)."""
    import yaml  # noqa: PLC0415
    from yaml.composer import ComposerError  # noqa: PLC0415
    from yaml.constructor import ConstructorError  # noqa: PLC0415

    class BoundedLoader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            # The composer recurses per nesting level: stop before Python's recursion limit does.
            if self._depth >= MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError, TypeError) as exc:  # e.g. a date 2024-13-45, an int "0b_"
                if isinstance(exc, yaml.YAMLError):
                    raise
                what = f"{node.value!r:.60}" if isinstance(node.value, str) else node.tag
                raise ConstructorError(None, None, f"{what}: {exc}", node.start_mark) from None

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[object, object] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` merges are meant to be overridden by the keys beside them
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:
                        continue  # unhashable: the base class gives its own error
                    if first is not key_node:
                        line = first.start_mark.line + 1
                        raise ConstructorError(
                            None, None, f"duplicate key {key!r:.60} (first at line {line})", key_node.start_mark
                        )
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node):
            text = str(node.value)
            if len(text) > _MAX_INT_TEXT:
                raise ConstructorError(None, None, f"integer {text:.40}... is too long for 64 bits", node.start_mark)
            value = super().construct_yaml_int(node)
            if not INT_MIN <= value <= INT_MAX:
                raise ConstructorError(
                    None, None, f"integer {text} does not fit in 64 bits (-2**63 .. 2**63-1)", node.start_mark
                )
            return value

        def construct_yaml_float(self, node):
            value = super().construct_yaml_float(node)
            if not math.isfinite(value):
                raise ConstructorError(None, None, f"{node.value} is not a finite number", node.start_mark)
            return value

    BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
    BoundedLoader.add_constructor("tag:yaml.org,2002:float", BoundedLoader.construct_yaml_float)
    return BoundedLoader
