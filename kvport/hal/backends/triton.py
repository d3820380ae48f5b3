"""The Triton copy backend: gather/scatter for every descriptor on NVIDIA, AMD and Intel XPU through Triton.
Owns the adapter from the Backend interface to kvport.kernels.triton; must not hold kernel code or pick paths."""

from __future__ import annotations

import importlib.util
import os

from kvport.hal.backend import Backend, Verdict
from kvport.hal.transfer.segments import check_buffer
from kvport.hal.transfer.tables import TableCache, device_block_ids

GPU_PLATFORMS = ("cuda", "rocm", "xpu")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _elem_bytes(width: int) -> int:
    # 32-bit elements with a 4-wide hint give 16-byte vectors; Triton has no 128-bit integer type.
    return 4 if width >= 4 else width


class TritonBackend(Backend):
    name = "triton"
    priority = 10

    # Transfer may pass one device copy of the flat block ids to every piece of a staged transfer.
    accepts_flat_ids = True

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
        if not descriptor.streams:
            return Verdict.no(f"{descriptor.layout}: descriptor has no streams")
        devices = {s.buffer.device for s in descriptor.streams}
        if len(devices) != 1:
            return Verdict.no(f"{descriptor.layout}: streams span several devices ({sorted(map(str, devices))})")
        device = next(iter(devices))
        if device.type == "cpu" and not interpreter_on():
            return Verdict.no(f"{descriptor.layout}: engine memory is on the CPU and TRITON_INTERPRET is unset")
        return Verdict.yes(f"{descriptor.layout}: every stream is a strided row copy")

    def gather(self, descriptor, block_ids, dst, num_tokens, max_programs: int | None = None, flat_ids=None) -> None:
        self._run(descriptor, block_ids, dst, num_tokens, True, max_programs, flat_ids)

    def scatter(self, src, descriptor, block_ids, num_tokens, max_programs: int | None = None, flat_ids=None) -> None:
        self._run(descriptor, block_ids, src, num_tokens, False, max_programs, flat_ids)

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

    def _run(self, descriptor, block_ids, chunk, num_tokens, gather, max_programs, flat_ids) -> None:
        from kvport.kernels.triton.segment_copy import launch

        device = descriptor.streams[0].buffer.device
        name = "gather dst" if gather else "scatter src"
        check_buffer(name, chunk, descriptor.canonical_bytes(num_tokens), engine_device=device)
        if num_tokens <= 0:
            return
        plan, launches = self._tables.get(descriptor, num_tokens, chunk, _elem_bytes)
        blocks = flat_ids if flat_ids is not None else device_block_ids(descriptor, block_ids, num_tokens, device)
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
