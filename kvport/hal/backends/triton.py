"""The Triton copy backend: gather/scatter for every descriptor on NVIDIA, AMD and Intel XPU through Triton.
Owns the adapter from the Backend interface to kvport.kernels.triton; must not hold kernel code or pick paths."""

from __future__ import annotations

import importlib.util
import os

from kvport.hal.backend import Verdict
from kvport.hal.backends.segmented import SegmentedBackend
from kvport.hal.transfer.tables import TableCache

GPU_PLATFORMS = ("cuda", "rocm", "xpu")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _elem_bytes(width: int) -> int:
    # 32-bit elements with a 4-wide hint give 16-byte vectors; Triton has no 128-bit integer type.
    return 4 if width >= 4 else width


class TritonBackend(SegmentedBackend):
    name = "triton"
    priority = 10

    def __init__(self) -> None:
        self._tables = TableCache("first", max_width=16)
        self._anchors: dict = {}

    def available(self, platform) -> Verdict:
        if importlib.util.find_spec("triton") is None:
            return Verdict.no("triton is not installed (pip install kvport[triton])")
        if platform.name in GPU_PLATFORMS:
            return Verdict.yes(f"Triton kernels on {platform.name}")
        if interpreter_on():
            return Verdict.yes("TRITON_INTERPRET=1: Triton interpreter on CPU (slow; for tests)")
        return Verdict.no(f"Triton needs a GPU (cuda, rocm, xpu); platform is {platform.name} (TRITON_INTERPRET unset)")

    def supports(self, descriptor) -> Verdict:
        device, refusal = self._one_device(descriptor)
        if refusal is not None:
            return refusal
        if device.type == "cpu" and not interpreter_on():
            return Verdict.no(f"{descriptor.layout}: engine memory is on the CPU and TRITON_INTERPRET is unset")
        return Verdict.yes(f"{descriptor.layout}: every stream is a strided row copy")

    def _anchor(self, storage, elem_bytes: int, device):
        import torch

        key = (storage.data_ptr(), elem_bytes, str(device))
        anchor = self._anchors.get(key)
        if anchor is None:
            dtype = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[elem_bytes]
            anchor = torch.empty(0, dtype=dtype, device=device)
            anchor.set_(storage, 0, (storage.nbytes() // elem_bytes,))
            # The anchor holds its storage, so the address in the key cannot be reused while cached (the table
            # cache holds the descriptor, and with it the same storage, for the same lifetime).
            if len(self._anchors) > 256:
                self._anchors.clear()
            self._anchors[key] = anchor
        return anchor

    def _launch(self, descriptor, chunk, num_tokens, blocks, gather, max_programs, device) -> None:
        from kvport.kernels.triton.segment_copy import launch

        plan, launches = self._tables.get(descriptor, num_tokens, chunk, _elem_bytes)
        storage = descriptor.streams[0].buffer.untyped_storage()
        for item in launches:
            anchor = self._anchor(storage, item.elem_bytes, device)
            launch(
                anchor,
                item.table,
                blocks,
                (chunk.data_ptr() - plan.anchor) // item.elem_bytes,
                item.n_streams,
                item.launch.max_supers,
                item.launch.max_row_len * (item.launch.width // item.elem_bytes),
                item.vec,
                gather,
                max_programs=max_programs,
            )
