"""Field-level validation for layout YAML: typed values, `$dims` substitution, widths with units, axes, layers.
Owns the one-line messages for single fields; must not know how fields combine into a group (that is loader.py)."""

from __future__ import annotations

import re

from kvport.layouts.exprs import ExprError, substitute
from kvport.layouts.limits import MAX_LAYERS
from kvport.layouts.spec import AXIS_LETTERS, DTYPE_SIZES, Dims, LayoutError

# ASCII digits only: \d also matches other scripts' digits (Arabic-Indic "٣"), which no YAML reader takes as a number.
_INT = re.compile(r"-?[0-9]{1,19}")  # 19 digits: int64 (larger would be refused anyway; this keeps int() cheap)


def coerce(value: object) -> object:
    """A dim given as text (``--dims layers=32``) -> int when it is one; anything else stays text for the checks."""
    # Not lstrip("-").isdigit(): int() refuses "--3" and "2²", which would be a traceback, not a one-line error.
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return value


def tname(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


class Ctx:
    """Validation helpers that know the file label and the dims for `$` substitution."""

    def __init__(self, label: str, dims: dict[str, object]) -> None:
        self.label = label
        self.dims = dims

    def fail(self, path: str, msg: str) -> LayoutError:
        return LayoutError(f"{self.label}: {path}: {msg}" if path else f"{self.label}: {msg}")

    def need(self, obj: dict, key: str, path: str) -> object:
        if key not in obj:
            raise self.fail(path or "top level", f"missing field {key!r}")
        return self.sub(obj[key], f"{path}.{key}" if path else key)

    def sub(self, value: object, path: str) -> object:
        try:
            return substitute(value, self.dims)
        except ExprError as exc:
            raise self.fail(path, str(exc)) from None

    def unknown(self, obj: dict, allowed: set[str], path: str) -> None:
        for key in obj:
            if key not in allowed:
                raise self.fail(path or "top level", f"unknown field {key!r} (fields: {', '.join(sorted(allowed))})")

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {tname(value)}")
        return value

    def mapping(self, value: object, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {tname(value)}")
        return value

    def positive(self, value: object, path: str, zero_ok: bool = False, limit: int | None = None) -> int:
        value = self.sub(value, path)
        if type(value) is not int:
            raise self.fail(path, f"expected an integer, got {tname(value)}")
        if value < 0 or (value == 0 and not zero_ok):
            raise self.fail(path, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")
        if limit is not None and value > limit:
            raise self.fail(path, f"{value} is over the limit of {limit} (kvport/layouts/limits.py says why)")
        return value

    def choice(self, value: object, path: str, options: tuple[str, ...]) -> str:
        value = self.sub(value, path)
        if value not in options:
            raise self.fail(path, f"{value!r} is not one of {', '.join(options)}")
        return value

    def dtype(self, value: object, path: str) -> str:
        value = self.sub(value, path)
        if not isinstance(value, str) and type(value).__name__ == "dtype":  # a torch.dtype passed as a dim
            value = str(value).removeprefix("torch.")
        if not isinstance(value, str) or value not in DTYPE_SIZES:  # a list or mapping is not hashable
            raise self.fail(path, f"unknown dtype {value!r} (dtypes: {', '.join(DTYPE_SIZES)})")
        return value

    def size(self, value: object, path: str, itemsize: int) -> tuple[int, int]:
        """A width with its unit, ``{elements: N}`` or ``{bytes: N}`` -> (elements, bytes)."""
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("elements", "bytes"):
            raise self.fail(path, f"expected {{elements: N}} or {{bytes: N}}, got {tname(value)}")
        unit, amount = next(iter(value.items()))
        amount = self.positive(amount, f"{path}.{unit}")
        if unit == "elements":
            return amount, amount * itemsize
        if amount % itemsize:
            raise self.fail(f"{path}.bytes", f"{amount} is not a multiple of the {itemsize}-byte dtype")
        return amount // itemsize, amount


def parse_axes(ctx: Ctx, value: object, path: str) -> Dims:
    text = ctx.sub(value, path)
    if not isinstance(text, str) or not text:
        raise ctx.fail(path, f"expected an axis string like KBNHC, got {tname(text)}")
    dims: list[tuple[str, ...]] = []
    seen: set[str] = set()
    i = 0
    while i < len(text):
        if text[i] == "(":
            end = text.find(")", i)
            if end < 0 or end == i + 1:
                raise ctx.fail(path, f"unbalanced or empty parentheses in {text!r}")
            letters, i = text[i + 1 : end], end + 1
        else:
            letters, i = text[i], i + 1
        for letter in letters:
            if letter not in AXIS_LETTERS:
                raise ctx.fail(path, f"unknown axis letter {letter!r} in {text!r}; letters are L B K H D N C")
            if letter in seen:
                raise ctx.fail(path, f"axis {letter!r} repeated in {text!r}")
            seen.add(letter)
        dims.append(tuple(letters))
    return tuple(dims)


def parse_layers(ctx: Ctx, value: object, path: str) -> tuple[int, ...]:
    # Bounded before the indices are materialised: `layers: 10**9` once took 17 s and 3.9 GB here.
    value = ctx.sub(value, path)
    if type(value) is int:
        return tuple(range(ctx.positive(value, path, limit=MAX_LAYERS)))
    if isinstance(value, list) and value:
        top = MAX_LAYERS - 1
        out = tuple(ctx.positive(v, f"{path}[{j}]", zero_ok=True, limit=top) for j, v in enumerate(value))
    elif isinstance(value, dict):
        ctx.unknown(value, {"start", "count", "step"}, path)
        start = ctx.positive(value.get("start", 0), f"{path}.start", zero_ok=True)
        count = ctx.positive(ctx.need(value, "count", path), f"{path}.count", limit=MAX_LAYERS)
        step = ctx.positive(value.get("step", 1), f"{path}.step")
        last = start + (count - 1) * step
        if last >= MAX_LAYERS:
            raise ctx.fail(
                path, f"last layer index {last} is over the limit of {MAX_LAYERS - 1} (see kvport/layouts/limits.py)"
            )
        out = tuple(range(start, start + count * step, step))
    else:
        raise ctx.fail(
            path, f"expected a layer count, a list of layer indices or {{start, count, step}}, got {tname(value)}"
        )
    if len(set(out)) != len(out):
        raise ctx.fail(path, f"layer indices repeat: {list(out)}")
    return out
