"""Layout spec dataclasses: a model's KV cache as an engine stores it, one GroupSpec per layer group.
Owns the validated, immutable spec and the sizes derived from it; must not parse YAML or touch tensors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence

from kvport.errors import UserError

# Axis letters (vLLM's vocabulary plus K and D): L layer, B block, K the K/V component, H head (row within a slot),
# N slot within a block, C content of one row, D chunks of a row when the row is stored as `vector`-wide pieces
# with other axes between them (ROCm's x-packed K: [heads, head_dim/x, block_size, x]).
AXIS_LETTERS = "LBKHDNC"
KINDS = ("attention", "mla", "indexer", "state", "opaque")
STRUCTURES = ("per_layer", "shared", "kv_lists")

# Item sizes in bytes; kept here so validation needs no torch import.
DTYPE_SIZES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
}

Dims = tuple[tuple[str, ...], ...]


class LayoutError(UserError):
    """A layout spec or an engine tensor that does not match its spec; one line naming file/field/value."""


def format_axes(dims: Dims) -> str:
    return "".join(d[0] if len(d) == 1 else "(" + "".join(d) + ")" for d in dims)


def shape_words(dims: Dims, per_block: Sequence[int]) -> list[str]:
    """A shape for messages from ``dim_sizes(dims)``: a B dim reads 'blocks' or 'N*blocks', the others a number."""
    return [("blocks" if n == 1 else f"{n}*blocks") if "B" in d else str(n) for d, n in zip(dims, per_block)]


@dataclasses.dataclass(frozen=True)
class PlaneSpec:
    """One plane inside a block (e.g. fp8 values, then fp32 scales): slots_per_block * heads rows of row_bytes."""

    name: str
    dtype: str
    row_bytes: int
    heads: int = 1
    align_bytes: int = 1

    @property
    def slot_bytes(self) -> int:
        return self.heads * self.row_bytes


@dataclasses.dataclass(frozen=True)
class Component:
    """One canonical component of a group: ``rows`` rows of ``row_bytes`` per slot, per layer."""

    name: str
    rows: int
    row_bytes: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One layer group, as the engine stores it.

    ``axes`` is the memory order (outermost first) of the engine tensor's dims, each dim one or more letters
    (a merged dim like ``(BN)`` is SGLang's token index); ``shape_order`` is the order in which the tensor's
    shape lists those dims (vLLM hands HND caches with an NHD shape and permuted strides). ``strides_bytes``
    holds explicit strides (bytes) for single-letter dims; the others are dense.
    """

    name: str
    kind: str
    layers: tuple[int, ...]
    tokens_per_block: int
    tokens_per_slot: int
    structure: str
    hands: str
    axes: Dims
    shape_order: Dims
    components: tuple[str, ...]
    heads: int
    dtype: str
    content_elems: int
    padded_elems: int
    strides_bytes: tuple[tuple[str, int], ...] = ()
    planes: tuple[PlaneSpec, ...] = ()
    # Component name -> elements per row piece, for groups with a D axis (a row = content/vector pieces).
    vectors: tuple[tuple[str, int], ...] = ()

    @property
    def opaque(self) -> bool:
        return self.kind == "opaque"

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def slots_per_block(self) -> int:
        return self.tokens_per_block // self.tokens_per_slot

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for dim in self.axes for letter in dim)

    def vector_elems(self, component: int = 0) -> int:
        """Elements of one row piece of a component: the whole row unless the group has a D axis."""
        return dict(self.vectors)[self.components[component]] if self.vectors else self.padded_elems

    def letter_sizes(self, num_blocks: int, component: int = 0) -> dict[str, int]:
        """Size of every axis letter for ``num_blocks`` blocks (C in elements, padding included). With a D axis, C is
        one piece of ``component``'s row and D the pieces per row (a tensor's shape does not depend on the component:
        the loader keeps D and C of per-component vectors inside one dim)."""
        vector = self.vector_elems(component)
        return {
            "L": len(self.layers),
            "B": num_blocks,
            "K": len(self.components),
            "H": self.heads,
            "D": self.padded_elems // vector,
            "N": self.slots_per_block,
            "C": vector,
        }

    def handed_dims(self) -> Dims:
        """Dims, in shape order, of each tensor the engine hands over (L and K are list indices for some structures)."""
        drop = {"per_layer": "L", "kv_lists": "LK", "shared": "L" if self.hands == "layers" else ""}[self.structure]
        return tuple(d for d in self.shape_order if not set(d) & set(drop))

    def dim_sizes(self, dims: Dims, num_blocks: int = 1) -> list[int]:
        """Each dim's size (its letters' sizes multiplied); with ``num_blocks`` 1, what a B dim holds per block."""
        sizes = self.letter_sizes(num_blocks)
        return [math.prod(sizes[letter] for letter in dim) for dim in dims]

    def k_outside_block(self) -> bool:
        """K/V are separate streams of an opaque group when they are separate tensors or K is outer to B."""
        letters = self.letters
        return self.structure == "kv_lists" or ("K" in letters and letters.index("K") < letters.index("B"))

    def opaque_row_letters(self) -> tuple[str, ...]:
        """Letters spanned by one opaque row (one layer's, one component's bytes of one block)."""
        skip = "LBK" if self.k_outside_block() else "LB"
        return tuple(x for x in self.letters if x not in skip)

    def canonical_components(self) -> tuple[Component, ...]:
        if self.planes:
            return tuple(Component(p.name, p.heads, p.row_bytes, p.dtype) for p in self.planes)
        if self.opaque:
            # One row per block per layer (per K/V component when K lies outside the block).
            sizes = self.letter_sizes(1)
            row = self.itemsize
            for letter in self.opaque_row_letters():
                row *= sizes[letter]
            names = self.components if self.k_outside_block() else ("block",)
            return tuple(Component(n, 1, row, self.dtype) for n in names)
        row = self.content_elems * self.itemsize
        return tuple(Component(n, self.heads, row, self.dtype) for n in self.components)

    def plane_offsets(self) -> list[int]:
        """Byte offset of each plane inside a block: planes back to back, each start rounded up to its alignment."""
        offsets, at = [], 0
        for plane in self.planes:
            at = -(-at // plane.align_bytes) * plane.align_bytes
            offsets.append(at)
            at += self.slots_per_block * plane.slot_bytes
        return offsets

    def block_bytes(self) -> int:
        """Bytes of one block of one layer as the tensor's shape spans it (letters inside B except L and K)."""
        sizes = self.letter_sizes(1)
        letters = self.letters
        total = self.itemsize
        for letter in letters[letters.index("B") + 1 :]:
            if letter not in "LK":
                total *= sizes[letter]
        return total

    def tokens_per_canonical_slot(self) -> int:
        """Tokens behind one canonical slot: a whole block for opaque groups, else one (compressed) slot."""
        return self.tokens_per_block if self.opaque else self.tokens_per_slot

    def canonical_slot_bytes(self) -> int:
        """Canonical bytes of one slot, all components of all this group's layers."""
        return sum(c.rows * c.row_bytes for c in self.canonical_components()) * len(self.layers)

    def canonical_bytes(self, num_tokens: int) -> int:
        """This group's share of a canonical chunk of ``num_tokens`` tokens (a partial last slot counts whole)."""
        return -(-num_tokens // self.tokens_per_canonical_slot()) * self.canonical_slot_bytes()

    def bytes_per_token(self) -> float:
        """Canonical bytes per token of this group, all its layers (compressed slots count fractionally)."""
        return self.canonical_slot_bytes() / self.tokens_per_canonical_slot()


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """A whole model's KV layout: name, where it came from, the dims it was built with, and its groups."""

    name: str
    source: str
    dims: tuple[tuple[str, object], ...]
    groups: tuple[GroupSpec, ...]
    description: str = ""

    @property
    def opaque(self) -> bool:
        return any(g.opaque for g in self.groups)

    def bytes_per_token(self) -> float:
        return sum(g.bytes_per_token() for g in self.groups)

    def canonical_description(self) -> list:
        """What the canonical chunk format depends on; block sizes do not matter except for opaque groups."""
        out = []
        for g in self.groups:
            entry = {
                "kind": g.kind,
                "tokens_per_slot": g.tokens_per_slot,
                "layers": list(g.layers),
                "components": [dataclasses.astuple(c) for c in g.canonical_components()],
            }
            if g.opaque:
                entry |= {"layout": self.name, "tokens_per_block": g.tokens_per_block, "axes": format_axes(g.axes)}
            out.append(entry)
        return out

    def canonical_fingerprint(self) -> str:
        blob = json.dumps(self.canonical_description(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]
