"""Dimension substitution for layout family files: `$name` references and small integer arithmetic on them.
Owns the safe expression evaluator; must not evaluate anything beyond integers, names and + - * // ( )."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping

# What may follow `$`: a dim that is not such a name could never be referred to.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"\$(" + NAME.pattern + ")")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
# Specs' expressions are a few terms ("$kv_lora_rank + $rope_dim"); a bound keeps evaluation (recursive, one level
# per operator) far from Python's recursion limit. Values stay in int64, what shapes and byte offsets hold.
MAX_EXPR_CHARS = 200
_INT64 = 1 << 63


class ExprError(ValueError):
    """A `$` expression that cannot be evaluated; the message is one line without the field path."""


def substitute(value: object, dims: Mapping[str, object]) -> object:
    """Resolve `$dim` references in a YAML scalar. Non-strings and strings without `$` pass through unchanged.

    A string that is exactly one reference (``$dtype``) takes the dim's value as is (any type); anything else
    is an integer expression (``2 * $head_dim``, ``$kv_lora_rank + $rope_dim``).
    """
    if not isinstance(value, str) or "$" not in value:
        return value
    text = value.strip()
    whole = _NAME.fullmatch(text)
    if whole:
        return _lookup(whole.group(1), dims, value)
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters: {text[:40]!r}...")
    py = _NAME.sub(lambda m: m.group(1), text)
    try:
        tree = ast.parse(py, mode="eval")
    except SyntaxError:
        raise ExprError(f"cannot parse expression {value!r}") from None
    return _eval(tree.body, dims, value)


def _lookup(name: str, dims: Mapping[str, object], source: str) -> object:
    if name not in dims:
        known = ", ".join(sorted(dims)) or "none"
        raise ExprError(f"unknown dim {name!r} in {source!r} (dims: {known})")
    return dims[name]


def _eval(node: ast.AST, dims: Mapping[str, object], source: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        value = _lookup(node.id, dims, source)
        if type(value) is not int:
            raise ExprError(f"dim {node.id!r} is {value!r}, an integer is needed in {source!r}")
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_eval(node.left, dims, source), _eval(node.right, dims, source))
        if not -_INT64 <= value < _INT64:
            raise ExprError(f"{source!r} does not fit in 64 bits")
        return value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
        left, right = _eval(node.left, dims, source), _eval(node.right, dims, source)
        if right == 0 or left % right:
            raise ExprError(f"{right} does not divide {left} in {source!r}")
        return left // right
    raise ExprError(f"only integers, $dims and + - * // are allowed in {source!r}")
