"""YAML loader and validator for layout specs: family file + dims -> LayoutSpec, and the builtin catalog.
Owns every validation message (one line: file, field path, problem); must not import torch or touch tensors."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from kvport.layouts import limits
from kvport.layouts.exprs import NAME
from kvport.layouts.fields import Ctx, coerce, parse_axes, parse_layers, tname
from kvport.layouts.spec import (
    DTYPE_SIZES,
    KINDS,
    STRUCTURES,
    GroupSpec,
    LayoutError,
    LayoutSpec,
    PlaneSpec,
    format_axes,
)
from kvport.yamlio import load_yaml

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
    "vector",
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
        if not path.exists():  # a FIFO, a directory, a device: the reader names what it is
            raise LayoutError(f"{text}: no such layout file")
        return load_file(path, label=text, dims=dims)
    catalog = SPECS_DIR / f"{text}.yaml"
    if not catalog.is_file():
        raise LayoutError(f"unknown layout {text!r}; catalog: {', '.join(catalog_names())}")
    return load_file(catalog, label=catalog.name, dims=dims)


def load_file(path: Path, label: str | None = None, dims: Mapping[str, object] | None = None) -> LayoutSpec:
    label = label or str(path)
    return parse_spec(load_yaml(path, label, LayoutError), label, dims or {})


def parse_spec(raw: object, label: str, overrides: Mapping[str, object]) -> LayoutSpec:
    """Validate a parsed YAML document into a LayoutSpec; every problem is one LayoutError line."""
    ctx = Ctx(label, {})
    if not isinstance(raw, dict):
        raise LayoutError(f"{label}: expected a mapping at the top level, got {tname(raw)}")
    ctx.unknown(raw, _TOP_FIELDS, "")
    name = ctx.string(ctx.need(raw, "name", ""), "name")
    dims = dict(ctx.mapping(raw.get("dims", {}), "dims"))
    for key in dims:
        if not isinstance(key, str) or not NAME.fullmatch(key):
            raise LayoutError(f"{label}: dims: {key!r} is not a name that $ can refer to (letters, digits, _)")
    for key, value in overrides.items():
        if key not in dims:
            raise LayoutError(f"{label}: dims: unknown dim {key!r} (dims: {', '.join(sorted(dims)) or 'none'})")
        dims[key] = coerce(value)
    ctx.dims = dims
    default_dtype = raw.get("dtype")
    groups_raw = ctx.need(raw, "groups", "")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise LayoutError(f"{label}: groups: expected a non-empty list, got {tname(groups_raw)}")
    groups = tuple(_group(ctx, g, i, default_dtype) for i, g in enumerate(groups_raw))
    names = [g.name for g in groups]
    for i, gname in enumerate(names):
        if names.index(gname) != i:
            raise LayoutError(f"{label}: groups[{i}].name: {gname!r} repeats groups[{names.index(gname)}]")
    source = raw.get("source", "")
    description = raw.get("description", "")
    spec = LayoutSpec(name, str(source), tuple(sorted(dims.items())), groups, str(description))
    limits.check_spec(spec, ctx.fail)
    return spec


def _group(ctx: Ctx, raw: object, i: int, default_dtype: object) -> GroupSpec:
    p = f"groups[{i}]"
    if not isinstance(raw, dict):
        raise ctx.fail(p, f"expected a mapping, got {tname(raw)}")
    ctx.unknown(raw, _GROUP_FIELDS, p)
    name = ctx.string(ctx.sub(raw.get("name", f"g{i}"), f"{p}.name"), f"{p}.name")
    kind = ctx.choice(ctx.need(raw, "kind", p), f"{p}.kind", KINDS)
    layers = parse_layers(ctx, ctx.need(raw, "layers", p), f"{p}.layers")
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
    axes = parse_axes(ctx, ctx.need(raw, "axes", p), f"{p}.axes")
    shape_order = parse_axes(ctx, raw["shape_order"], f"{p}.shape_order") if "shape_order" in raw else axes
    heads = ctx.positive(raw.get("heads", 1), f"{p}.heads")
    content, _ = ctx.size(ctx.need(raw, "content", p), f"{p}.content", itemsize)
    padded = content
    if "padded_content" in raw:
        padded, _ = ctx.size(raw["padded_content"], f"{p}.padded_content", itemsize)
        if padded < content:
            raise ctx.fail(f"{p}.padded_content", f"{padded} elements is less than content {content}")
    planes = _planes(ctx, raw.get("planes"), f"{p}.planes") if "planes" in raw else ()
    components = _components(ctx, raw, p, kind, structure, axes, planes)
    vectors = _vectors(ctx, raw, p, components, content, padded, itemsize)
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
        vectors=vectors,
    )
    _check_axes(ctx, group, p, "shape_order" in raw)
    _check_vector(ctx, group, p)
    strides = _strides(ctx, raw.get("strides"), f"{p}.strides", group) if "strides" in raw else ()
    group = dataclasses.replace(group, strides_bytes=strides)
    if planes:
        _check_planes(ctx, group, p)
    limits.check_group(group, lambda field, msg: ctx.fail(f"{p}.{field}" if field else p, msg))
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
            raise ctx.fail(f"{p}.components", f"expected a non-empty list of names, got {tname(comps)}")
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


def _vectors(ctx, raw, p, components, content, padded, itemsize) -> tuple[tuple[str, int], ...]:
    """`vector`: one width, or one per component (``{k: {bytes: 16}, v: {elements: 1}}``), of the pieces a row is
    stored in; each must divide the row's content."""
    if "vector" not in raw:
        return ()
    path = f"{p}.vector"
    value = ctx.sub(raw["vector"], path)
    if isinstance(value, dict) and set(value) <= {"elements", "bytes"}:
        per = {c: value for c in components}
    elif isinstance(value, dict) and set(value) == set(components):
        per = value
    else:
        raise ctx.fail(path, f"expected a width or one width per component {list(components)}, got {tname(value)}")
    if padded != content:
        raise ctx.fail(path, "a row stored in vector pieces cannot also be padded (padded_content)")
    out = []
    for name in components:
        where = path if per is not value else f"{path}.{name}"
        elems, _ = ctx.size(per[name], where, itemsize)
        if content % elems:
            raise ctx.fail(where, f"{elems} elements do not divide the row's {content} elements")
        out.append((name, elems))
    return tuple(out)


def _check_vector(ctx: Ctx, g: GroupSpec, p: str) -> None:
    text = format_axes(g.axes)
    if "D" in g.letters and not g.vectors:
        raise ctx.fail(f"{p}.axes", f"{text!r} has a D axis (row pieces) but the group gives no vector width")
    if g.vectors and "D" not in g.letters:
        raise ctx.fail(f"{p}.vector", f"row pieces need a D axis in axes, got {text!r}")
    if not g.vectors:
        return
    if g.opaque or g.planes:
        raise ctx.fail(f"{p}.vector", "opaque groups and groups with planes have no vector pieces")
    letters = g.letters
    d_dim = next(d for d in g.axes if "D" in d)
    if not letters.index("B") < letters.index("D") < letters.index("C") or "B" in d_dim:
        raise ctx.fail(f"{p}.axes", f"{text!r}: D (row pieces) must lie inside the block, outside C")
    if len({n for _, n in g.vectors}) > 1:
        for order in (g.axes, g.shape_order):
            if not [d for d in order if "D" in d and "C" in d]:
                raise ctx.fail(
                    f"{p}.vector",
                    f"components differ in piece width, so D and C must share one dim in axes and shape ({text!r})",
                )


def _check_axes(ctx: Ctx, g: GroupSpec, p: str, explicit_shape: bool) -> None:
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
    if g.opaque:
        # An opaque row is one layer's (one component's) whole block: every letter it spans must lie inside B and be
        # innermost in one run, or the block's bytes are not one contiguous row (compile would refuse every tensor).
        row = g.opaque_row_letters()
        if letters[len(letters) - len(row) :] != row:
            raise ctx.fail(
                f"{p}.axes",
                f"{text!r}: an opaque block must be contiguous: axes {''.join(row)} must follow B innermost",
            )
    if explicit_shape:
        if sorted(g.shape_order) != sorted(g.axes):
            raise ctx.fail(
                f"{p}.shape_order", f"{format_axes(g.shape_order)!r} must list the same dims as axes {text!r}"
            )
        if g.shape_order[-1][-1] != "C":
            raise ctx.fail(f"{p}.shape_order", "C must stay the last dim of the shape")


def _strides(ctx: Ctx, value: object, path: str, g: GroupSpec) -> tuple[tuple[str, int], ...]:
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


def _planes(ctx: Ctx, value: object, path: str) -> tuple[PlaneSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(path, f"expected a non-empty list of planes, got {tname(value)}")
    out = []
    for j, raw in enumerate(value):
        pp = f"{path}[{j}]"
        if not isinstance(raw, dict):
            raise ctx.fail(pp, f"expected a mapping, got {tname(raw)}")
        ctx.unknown(raw, _PLANE_FIELDS, pp)
        name = ctx.string(ctx.sub(ctx.need(raw, "name", pp), f"{pp}.name"), f"{pp}.name")
        dtype = ctx.dtype(ctx.need(raw, "dtype", pp), f"{pp}.dtype")
        _, nbytes = ctx.size(ctx.need(raw, "content", pp), f"{pp}.content", DTYPE_SIZES[dtype])
        heads = ctx.positive(raw.get("heads", 1), f"{pp}.heads")
        align = 1
        if "align" in raw:
            align_raw = raw["align"]
            if not isinstance(align_raw, dict) or list(align_raw) != ["bytes"]:
                raise ctx.fail(f"{pp}.align", f"expected {{bytes: N}}, got {tname(align_raw)}")
            align = ctx.positive(align_raw["bytes"], f"{pp}.align.bytes")
        if any(pl.name == name for pl in out):
            raise ctx.fail(f"{pp}.name", f"plane {name!r} repeats")
        out.append(PlaneSpec(name, dtype, nbytes, heads, align))
    return tuple(out)


def _check_planes(ctx: Ctx, g: GroupSpec, p: str) -> None:
    if g.opaque:
        raise ctx.fail(f"{p}.planes", "opaque groups have no planes")
    if g.structure == "kv_lists":
        raise ctx.fail(f"{p}.planes", "planes divide one tensor's block; kv_lists hand K and V as separate tensors")
    end = g.plane_offsets()[-1] + g.slots_per_block * g.planes[-1].slot_bytes
    room = g.block_bytes()
    if end > room:
        raise ctx.fail(f"{p}.planes", f"planes need {end} bytes per block, the block holds {room}")
