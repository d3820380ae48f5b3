"""`kvport layout list|show|check`: browse the layout catalog, show a spec's groups and sizes, validate YAML files.
Owns argument handling and printing only; must not import torch (nothing here needs tensors)."""

from __future__ import annotations

import argparse
import sys

from kvport.errors import UserError

CHUNK_TOKENS = 256  # the cache's default chunk size (DESIGN.md), used for the "bytes per chunk" column


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="layout_command", metavar="ACTION")
    sub.add_parser("list", help="list the builtin layouts")
    show = sub.add_parser("show", help="show one layout's groups, tensor shapes and sizes")
    show.add_argument("name", help="catalog name or YAML file")
    add_dims_argument(show)
    show.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="tokens per chunk for the size column")
    check = sub.add_parser("check", help="validate layout YAML files (exit 2 on the first-line errors)")
    check.add_argument("files", nargs="+", metavar="FILE")
    add_dims_argument(check)


def add_dims_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dims", nargs="+", default=[], metavar="KEY=VALUE", help="override family dims, e.g. layers=32 head_dim=128"
    )


def parse_dims(items: list[str]) -> dict[str, str]:
    dims = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"--dims: {item!r} is not KEY=VALUE")
        dims[key.strip()] = value.strip()
    return dims


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "layout_command", None)
    if action == "list":
        return _list()
    if action == "show":
        return _show(args.name, parse_dims(args.dims), args.chunk_tokens)
    if action == "check":
        return _check(args.files, parse_dims(args.dims))
    raise UserError("expected an action: list, show NAME or check FILE...")


def _list() -> int:
    from kvport.layouts import catalog_names, load_layout

    specs = [load_layout(name) for name in catalog_names()]
    width = max(len(s.name) for s in specs)
    print(f"{'name':{width}}  groups  bytes/token  canonical   source")
    for s in specs:
        fingerprint = s.canonical_fingerprint()[:10]
        print(f"{s.name:{width}}  {len(s.groups):6}  {s.bytes_per_token():11g}  {fingerprint}  {s.source}")
    return 0


def _show(name: str, dims: dict[str, str], chunk_tokens: int) -> int:
    from kvport.layouts import load_layout
    from kvport.layouts.spec import format_axes

    if chunk_tokens <= 0:
        raise UserError(f"--chunk-tokens: must be > 0, got {chunk_tokens}")
    spec = load_layout(name, **dims)
    print(f"layout       {spec.name}")
    print(f"source       {spec.source}")
    if spec.description:
        print(f"description  {spec.description}")
    print(f"dims         {', '.join(f'{k}={v}' for k, v in spec.dims) or '-'}")
    print(f"canonical    {spec.canonical_fingerprint()}" + ("  (opaque: only this layout)" if spec.opaque else ""))
    print(f"bytes/token  {spec.bytes_per_token():g}")
    total = 0
    for gi, g in enumerate(spec.groups):
        comps = g.canonical_components()
        chunk = g.canonical_bytes(chunk_tokens)
        total += chunk
        layers = list(g.layers)
        print(f"groups[{gi}]    {g.name}: kind {g.kind}, {len(layers)} layers {_layer_text(layers)}")
        if g.opaque:
            print(f"  block      {g.tokens_per_block} tokens, copied whole (in-block bytes are kernel-specific)")
        else:
            slots = f"{g.tokens_per_slot} token(s)/slot, {g.slots_per_block} slots"
            print(f"  block      {g.tokens_per_block} tokens, {slots}")
        print(f"  structure  {g.structure}" + (f", handed as {g.hands}" if g.structure == "shared" else ""))
        order = format_axes(g.axes)
        shape_order = format_axes(g.shape_order)
        print(f"  axes       memory {order}" + (f", shape {shape_order}" if shape_order != order else ""))
        print(f"  tensor     {_tensor_text(g)} {g.dtype}")
        if g.padded_elems != g.content_elems:
            used, room = g.content_elems * g.itemsize, g.padded_elems * g.itemsize
            print(f"  padding    rows use {used} of {room} bytes")
        for letter, nbytes in g.strides_bytes:
            print(f"  stride     {letter} = {nbytes} bytes")
        for c in comps:
            unit = "block" if g.opaque else "slot"
            print(f"  component  {c.name}: {c.rows} row(s) x {c.row_bytes} bytes ({c.dtype}) per {unit}")
        print(f"  per chunk  {chunk} bytes for {chunk_tokens} tokens")
    print(f"chunk        {total} bytes for {chunk_tokens} tokens")
    return 0


def _layer_text(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[0] + len(layers))):
        return f"[{layers[0]}..{layers[-1]}]"
    return str(layers)


def _tensor_text(g) -> str:
    from kvport.layouts.spec import shape_words

    dims = g.handed_dims()
    shape = "[" + ", ".join(shape_words(dims, g.dim_sizes(dims))) + "]"
    n = len(g.layers)
    if g.structure == "per_layer" or (g.structure == "shared" and g.hands == "layers"):
        return f"{n} x {shape}" + (" (views into one buffer)" if g.structure == "shared" else "")
    if g.structure == "kv_lists":
        return f"2 lists (k, v) of {n} x {shape}"
    return f"one buffer {shape}"


def _check(files: list[str], dims: dict[str, str]) -> int:
    from pathlib import Path

    from kvport.layouts import load_file
    from kvport.layouts.spec import LayoutError

    failed = 0
    for name in files:
        path = Path(name)
        try:
            if not path.exists():  # anything else that is not a regular file gets its own reason from the loader
                raise LayoutError(f"{name}: no such file")
            spec = load_file(path, label=name, dims=dims)
        except LayoutError as exc:
            print(str(exc), file=sys.stderr)
            failed += 1
            continue
        print(f"ok  {name}: {spec.name}, {len(spec.groups)} group(s), {spec.bytes_per_token():g} bytes/token")
    return 2 if failed else 0
