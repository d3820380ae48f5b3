"""Declarative KV layouts: spec dataclasses, the YAML catalog, the compiler to copy descriptors and allocation.
Importing this package is cheap (no torch, no YAML parse); torch is imported only when tensors are involved."""

from kvport.layouts.allocate import EngineKV, allocate
from kvport.layouts.compiler import compile_descriptor
from kvport.layouts.descriptor import CopyDescriptor, GroupDesc, StreamDesc
from kvport.layouts.loader import catalog_names, load_file, load_layout
from kvport.layouts.spec import GroupSpec, LayoutError, LayoutSpec, PlaneSpec

__all__ = [
    "CopyDescriptor",
    "EngineKV",
    "GroupDesc",
    "GroupSpec",
    "LayoutError",
    "LayoutSpec",
    "PlaneSpec",
    "StreamDesc",
    "allocate",
    "catalog_names",
    "compile_descriptor",
    "load_file",
    "load_layout",
]
