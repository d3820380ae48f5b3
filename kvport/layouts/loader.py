"""YAML loader and validator for layout specs: family file + dims -> LayoutSpec, and the builtin catalog.
Owns every validation message (one line: file, field path, problem); must not import torch or touch tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kvport.layouts.exprs import ExprError, substitute
from kvport.layouts.spec import (
    AXIS_LETTERS,
    DTYPE_SIZES,
    KINDS,
    STRUCTURES,
    Dims,
    GroupSpec,
    LayoutError,
    LayoutSpec,
    PlaneSpec,
    format_axes,
)

SPECS_DIR = Path(__file__).with_name("specs")
_TOP_FIELDS = {"name", "source", "description", "dtype", "dims", "groups"}
_GROUP_FIELDS = {
    "name",
    "kind",
    "layers",
    "tokens_per_block",
    "tokens_per_slot",
    "structure",
    "hands",
    "axes",
    "shape_order",
    "components",
    "heads",
    "dtype",
    "content",
    "padded_content",
    "strides",
    "planes",
}
_PLANE_FIELDS = {"name", "dtype", "content", "heads", "align"}
_DEFAULT_COMPONENTS = {"attention": ("k", "v"), "mla": ("latent",), "indexer": ("indexer",), "state": ("state",)}


def catalog_names() -> list[str]:
    """Names of the builtin layouts (file stems under kvport/layouts/specs)."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_layout(name_or_path: str | os.PathLike, **dims: object) -> LayoutSpec:
    """A catalog name or a YAML path -> validated LayoutSpec; ``dims`` override the family's defaults."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or os.sep in text or path.is_file():
        if not path.is_file():
            raise LayoutError(f"{text}: no such layout file")
        return load_file(path, label=text, dims=dims)
    catalog = SPECS_DIR / f"{text}.yaml"
    if not catalog.is_file():
        raise LayoutError(f"unknown layout {text!r}; catalog: {', '.join(catalog_names())}")
    return load_file(catalog, label=catalog.name, dims=dims)


def load_file(path: Path, label: str | None = None, dims: Mapping[str, object] | None = None) -> LayoutSpec:
    import yaml  # noqa: PLC0415 - kept out of module import so `kvport --help` stays cheap

    label = label or str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LayoutError(f"{label}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LayoutError(f"{label}: invalid YAML{where}: {problem}") from None
    return parse_spec(raw, label, dims or {})


def parse_spec(raw: object, label: str, overrides: Mapping[str, object]) -> LayoutSpec:
    """Validate a parsed YAML document into a LayoutSpec; every problem is one LayoutError line."""
    ctx = _Ctx(label, {})
    if not isinstance(raw, dict):
        raise LayoutError(f"{label}: expected a mapping at the top level, got {_tname(raw)}")
    ctx.unknown(raw, _TOP_FIELDS, "")
    name = ctx.string(ctx.need(raw, "name", ""), "name")
    dims = dict(ctx.mapping(raw.get("dims", {}), "dims"))
    for key, value in overrides.items():
        if key not in dims:
            raise LayoutError(f"{label}: dims: unknown dim {key!r} (dims: {', '.join(sorted(dims)) or 'none'})")
        dims[key] = _coerce(value)
    ctx.dims = dims
    default_dtype = raw.get("dtype")
    groups_raw = ctx.need(raw, "groups", "")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise LayoutError(f"{label}: groups: expected a non-empty list, got {_tname(groups_raw)}")
    groups = tuple(_group(ctx, g, i, default_dtype) for i, g in enumerate(groups_raw))
    names = [g.name for g in groups]
    for i, gname in enumerate(names):
        if names.index(gname) != i:
            raise LayoutError(f"{label}: groups[{i}].name: {gname!r} repeats groups[{names.index(gname)}]")
    source = raw.get("source", "")
    description = raw.get("description", "")
    return LayoutSpec(name, str(source), tuple(sorted(dims.items())), groups, str(description))


def _coerce(value: object) -> object:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _tname(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


class _Ctx:
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
            raise self.fail(path, f"expected a non-empty string, got {_tname(value)}")
        return value

    def mapping(self, value: object, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_tname(value)}")
        return value

    def positive(self, value: object, path: str, zero_ok: bool = False) -> int:
        value = self.sub(value, path)
        if type(value) is not int:
            raise self.fail(path, f"expected an integer, got {_tname(value)}")
        if value < 0 or (value == 0 and not zero_ok):
            raise self.fail(path, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")
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
        if value not in DTYPE_SIZES:
            raise self.fail(path, f"unknown dtype {value!r} (dtypes: {', '.join(DTYPE_SIZES)})")
        return value

    def size(self, value: object, path: str, itemsize: int) -> tuple[int, int]:
        """A width with its unit, ``{elements: N}`` or ``{bytes: N}`` -> (elements, bytes)."""
        if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("elements", "bytes"):
            raise self.fail(path, f"expected {{elements: N}} or {{bytes: N}}, got {_tname(value)}")
        unit, amount = next(iter(value.items()))
        amount = self.positive(amount, f"{path}.{unit}")
        if unit == "elements":
            return amount, amount * itemsize
        if amount % itemsize:
            raise self.fail(f"{path}.bytes", f"{amount} is not a multiple of the {itemsize}-byte dtype")
        return amount // itemsize, amount


def _parse_axes(ctx: _Ctx, value: object, path: str) -> Dims:
    text = ctx.sub(value, path)
    if not isinstance(text, str) or not text:
        raise ctx.fail(path, f"expected an axis string like KBNHC, got {_tname(text)}")
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
                raise ctx.fail(path, f"unknown axis letter {letter!r} in {text!r}; letters are L B K H N C")
            if letter in seen:
                raise ctx.fail(path, f"axis {letter!r} repeated in {text!r}")
            seen.add(letter)
        dims.append(tuple(letters))
    return tuple(dims)


def _layers(ctx: _Ctx, value: object, path: str) -> tuple[int, ...]:
    value = ctx.sub(value, path)
    if type(value) is int:
        return tuple(range(ctx.positive(value, path)))
    if isinstance(value, list) and value:
        out = tuple(ctx.positive(v, f"{path}[{j}]", zero_ok=True) for j, v in enumerate(value))
    elif isinstance(value, dict):
        ctx.unknown(value, {"start", "count", "step"}, path)
        start = ctx.positive(value.get("start", 0), f"{path}.start", zero_ok=True)
        count = ctx.positive(ctx.need(value, "count", path), f"{path}.count")
        step = ctx.positive(value.get("step", 1), f"{path}.step")
        out = tuple(range(start, start + count * step, step))
    else:
        raise ctx.fail(
            path, f"expected a layer count, a list of layer indices or {{start, count, step}}, got {_tname(value)}"
        )
    if len(set(out)) != len(out):
        raise ctx.fail(path, f"layer indices repeat: {list(out)}")
    return out


def _group(ctx: _Ctx, raw: object, i: int, default_dtype: object) -> GroupSpec:
    p = f"groups[{i}]"
    if not isinstance(raw, dict):
        raise ctx.fail(p, f"expected a mapping, got {_tname(raw)}")
    ctx.unknown(raw, _GROUP_FIELDS, p)
    name = ctx.string(ctx.sub(raw.get("name", f"g{i}"), f"{p}.name"), f"{p}.name")
    kind = ctx.choice(ctx.need(raw, "kind", p), f"{p}.kind", KINDS)
    layers = _layers(ctx, ctx.need(raw, "layers", p), f"{p}.layers")
    tpb = ctx.positive(ctx.need(raw, "tokens_per_block", p), f"{p}.tokens_per_block")
    tps = ctx.positive(raw.get("tokens_per_slot", 1), f"{p}.tokens_per_slot")
    if tpb % tps:
        raise ctx.fail(f"{p}.tokens_per_slot", f"{tps} does not divide tokens_per_block {tpb}")
    if kind == "opaque" and tps != 1:
        raise ctx.fail(f"{p}.tokens_per_slot", "opaque groups copy whole blocks; tokens_per_slot must be 1")
    structure = ctx.choice(ctx.need(raw, "structure", p), f"{p}.structure", STRUCTURES)
    hands = ctx.choice(raw.get("hands", "buffer"), f"{p}.hands", ("buffer", "layers"))
    if "hands" in raw and structure != "shared":
        raise ctx.fail(f"{p}.hands", "only a shared structure can be handed as a buffer or as per-layer views")
    dtype_raw = raw.get("dtype", default_dtype)
    if dtype_raw is None:
        raise ctx.fail(p, "missing field 'dtype' (and no top-level dtype)")
    dtype = ctx.dtype(dtype_raw, f"{p}.dtype")
    itemsize = DTYPE_SIZES[dtype]
    axes = _parse_axes(ctx, ctx.need(raw, "axes", p), f"{p}.axes")
    shape_order = _parse_axes(ctx, raw["shape_order"], f"{p}.shape_order") if "shape_order" in raw else axes
    heads = ctx.positive(raw.get("heads", 1), f"{p}.heads")
    content, _ = ctx.size(ctx.need(raw, "content", p), f"{p}.content", itemsize)
    padded = content
    if "padded_content" in raw:
        padded, _ = ctx.size(raw["padded_content"], f"{p}.padded_content", itemsize)
        if padded < content:
            raise ctx.fail(f"{p}.padded_content", f"{padded} elements is less than content {content}")
    planes = _planes(ctx, raw.get("planes"), f"{p}.planes") if "planes" in raw else ()
    components = _components(ctx, raw, p, kind, structure, axes, planes)
    group = GroupSpec(
        name=name,
        kind=kind,
        layers=layers,
        tokens_per_block=tpb,
        tokens_per_slot=tps,
        structure=structure,
        hands=hands,
        axes=axes,
        shape_order=shape_order,
        components=components,
        heads=heads,
        dtype=dtype,
        content_elems=content,
        padded_elems=padded,
        planes=planes,
    )
    _check_axes(ctx, group, p, "shape_order" in raw)
    strides = _strides(ctx, raw.get("strides"), f"{p}.strides", group) if "strides" in raw else ()
    group = GroupSpec(**{**group.__dict__, "strides_bytes": strides})
    if planes:
        _check_planes(ctx, group, p)
    return group


def _components(ctx, raw, p, kind, structure, axes, planes) -> tuple[str, ...]:
    if planes:
        if "components" in raw:
            raise ctx.fail(f"{p}.components", "a group with planes takes its components from the plane names")
        return tuple(pl.name for pl in planes)
    letters = [x for d in axes for x in d]
    if "components" in raw:
        comps = ctx.sub(raw["components"], f"{p}.components")
        if not isinstance(comps, list) or not comps or not all(isinstance(c, str) and c for c in comps):
            raise ctx.fail(f"{p}.components", f"expected a non-empty list of names, got {_tname(comps)}")
        if len(set(comps)) != len(comps):
            raise ctx.fail(f"{p}.components", f"names repeat: {comps}")
        comps = tuple(comps)
    elif kind == "opaque":
        comps = ("k", "v") if "K" in letters or structure == "kv_lists" else ("block",)
    else:
        comps = _DEFAULT_COMPONENTS[kind]
    if structure == "kv_lists" and len(comps) != 2:
        raise ctx.fail(f"{p}.components", f"kv_lists needs exactly two components (k, v), got {list(comps)}")
    return comps


def _check_axes(ctx: _Ctx, g: GroupSpec, p: str, explicit_shape: bool) -> None:
    letters = g.letters
    text = format_axes(g.axes)
    for must in "BNC":
        if must not in letters:
            raise ctx.fail(f"{p}.axes", f"{text!r} lacks axis {must!r} (B block, N slot and C content are required)")
    if letters[-1] != "C":
        raise ctx.fail(f"{p}.axes", f"{text!r}: C (row content) must be the innermost axis")
    if ("L" in letters) != (g.structure == "shared"):
        need = "needs" if g.structure == "shared" else "must not have"
        raise ctx.fail(f"{p}.axes", f"{text!r}: structure {g.structure} {need} an L axis")
    if "L" in letters and ("L",) not in g.axes:
        raise ctx.fail(f"{p}.axes", f"{text!r}: L must be a dim of its own, not merged")
    want_k = g.structure != "kv_lists" and len(g.components) > 1 and not g.planes
    if ("K" in letters) != want_k:
        why = (
            f"{len(g.components)} components {list(g.components)}"
            if g.structure != "kv_lists"
            else "kv_lists hold K and V as separate tensors"
        )
        raise ctx.fail(f"{p}.axes", f"{text!r}: {'needs' if want_k else 'must not have'} a K axis ({why})")
    if "H" not in letters and g.heads != 1:
        raise ctx.fail(f"{p}.heads", f"{g.heads} heads but axes {text!r} have no H axis")
    if g.structure == "kv_lists" and g.hands != "buffer":
        raise ctx.fail(f"{p}.hands", "kv_lists are always handed as lists")
    if explicit_shape:
        if sorted(g.shape_order) != sorted(g.axes):
            raise ctx.fail(
                f"{p}.shape_order", f"{format_axes(g.shape_order)!r} must list the same dims as axes {text!r}"
            )
        if g.shape_order[-1][-1] != "C":
            raise ctx.fail(f"{p}.shape_order", "C must stay the last dim of the shape")


def _strides(ctx: _Ctx, value: object, path: str, g: GroupSpec) -> tuple[tuple[str, int], ...]:
    value = ctx.mapping(value, path)
    letters = g.letters
    inner_of_b = set(letters[letters.index("B") + 1 :])
    out: dict[str, int] = {}
    for letter, amount in value.items():
        lp = f"{path}.{letter}"
        if letter not in letters:
            raise ctx.fail(lp, f"no axis {letter!r} in {format_axes(g.axes)!r}")
        if (letter,) not in g.axes:
            raise ctx.fail(lp, f"axis {letter!r} is merged into a dim; only single-letter dims take strides")
        if letter == "C":
            raise ctx.fail(lp, "C is always dense (rows are contiguous); pad rows with padded_content instead")
        if letter not in inner_of_b | {"B"}:
            raise ctx.fail(lp, "only B and the axes inside a block take explicit strides")
        _, nbytes = ctx.size(amount, lp, g.itemsize)
        out[letter] = nbytes
    # Overlap check, innermost first: each dim must step past the whole extent of the dims inside it.
    sizes = g.letter_sizes(1)
    extent = g.itemsize
    for dim in reversed(g.axes):
        dense = extent
        for letter in reversed(dim):
            if letter in out and out[letter] < dense:
                raise ctx.fail(
                    f"{path}.{letter}",
                    f"{out[letter]} bytes overlaps the {dense}-byte extent of the axes inside it",
                )
            stride = out.get(letter, dense)
            dense = stride * sizes[letter]
        extent = dense
        if dim[0] == "B":
            break
    return tuple(sorted(out.items()))


def _planes(ctx: _Ctx, value: object, path: str) -> tuple[PlaneSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(path, f"expected a non-empty list of planes, got {_tname(value)}")
    out = []
    for j, raw in enumerate(value):
        pp = f"{path}[{j}]"
        if not isinstance(raw, dict):
            raise ctx.fail(pp, f"expected a mapping, got {_tname(raw)}")
        ctx.unknown(raw, _PLANE_FIELDS, pp)
        name = ctx.string(ctx.sub(ctx.need(raw, "name", pp), f"{pp}.name"), f"{pp}.name")
        dtype = ctx.dtype(ctx.need(raw, "dtype", pp), f"{pp}.dtype")
        _, nbytes = ctx.size(ctx.need(raw, "content", pp), f"{pp}.content", DTYPE_SIZES[dtype])
        heads = ctx.positive(raw.get("heads", 1), f"{pp}.heads")
        align = 1
        if "align" in raw:
            align_raw = raw["align"]
            if not isinstance(align_raw, dict) or list(align_raw) != ["bytes"]:
                raise ctx.fail(f"{pp}.align", f"expected {{bytes: N}}, got {_tname(align_raw)}")
            align = ctx.positive(align_raw["bytes"], f"{pp}.align.bytes")
        if any(pl.name == name for pl in out):
            raise ctx.fail(f"{pp}.name", f"plane {name!r} repeats")
        out.append(PlaneSpec(name, dtype, nbytes, heads, align))
    return tuple(out)


def plane_offsets(g: GroupSpec) -> list[int]:
    """Byte offset of each plane inside a block: planes back to back, each start rounded up to its alignment."""
    offsets, at = [], 0
    for plane in g.planes:
        at = -(-at // plane.align_bytes) * plane.align_bytes
        offsets.append(at)
        at += g.slots_per_block * plane.slot_bytes
    return offsets


def block_region_bytes(g: GroupSpec) -> int:
    """Bytes of one block of one layer as the tensor's shape spans it (letters inside B, dense)."""
    sizes = g.letter_sizes(1)
    letters = g.letters
    total = g.itemsize
    for letter in letters[letters.index("B") + 1 :]:
        if letter not in "LK":
            total *= sizes[letter]
    return total


def _check_planes(ctx: _Ctx, g: GroupSpec, p: str) -> None:
    if g.opaque:
        raise ctx.fail(f"{p}.planes", "opaque groups have no planes")
    end = plane_offsets(g)[-1] + g.slots_per_block * g.planes[-1].slot_bytes
    room = block_region_bytes(g)
    if end > room:
        raise ctx.fail(f"{p}.planes", f"planes need {end} bytes per block, the block holds {room}")
