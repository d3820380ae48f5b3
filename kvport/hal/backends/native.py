"""The native copy backends (cuda, hip): gather/scatter through kvport._native_<target> on the current stream.
Owns the adapter from the Backend interface to the compiled module; must not build it or hold kernel code."""

from __future__ import annotations

from kvport.hal.backend import Verdict
from kvport.hal.backends.segmented import SegmentedBackend
from kvport.hal.transfer.tables import TableCache

# Which torch platform each native target serves (ROCm torch still calls its devices "cuda").
PLATFORM_OF = {"cuda": "cuda", "hip": "rocm"}


class NativeBackend(SegmentedBackend):
    target = ""
    priority = 20

    def __init__(self) -> None:
        self._tables = TableCache("zero", max_width=16)
        self._module = None
        self._packed: dict = {}  # one-call chunks' launch rows, see _pack

    def module(self):
        if self._module is None:
            from kvport.hal.native import load_native

            self._module = load_native(self.target)
        return self._module

    @property
    def batched_copies(self) -> bool:
        """Whether this build's DMA path describes regions in batched calls (kvport.hal.native.has_batched_copies)."""
        from kvport.hal.native import has_batched_copies

        return has_batched_copies(self.module())

    def available(self, platform) -> Verdict:
        from kvport.hal.native import native_status

        want = PLATFORM_OF[self.target]
        if platform.name != want:
            return Verdict.no(f"native {self.target} kernels need a {want} platform; platform is {platform.name}")
        status = native_status()
        if status.target != self.target:
            return Verdict.no(
                f"native module not built for {self.target} (build target: {status.target}; "
                f"{status.reason}); reinstall with KVPORT_TARGET={self.target}"
            )
        if not status.loadable:
            return Verdict.no(status.reason)
        return Verdict.yes(f"kvport._native_{self.target} ({', '.join(status.archs) or 'archs unknown'})")

    def expected(self, platform) -> bool:
        from kvport.hal.native import read_build_info

        info = read_build_info() or {}
        return info.get("target") == self.target and platform.name == PLATFORM_OF[self.target]

    def supports(self, descriptor) -> Verdict:
        device, refusal = self._one_device(descriptor)
        if refusal is not None and not descriptor.streams:
            return refusal
        if device is None or device.type != "cuda":
            devices = sorted({str(s.buffer.device) for s in descriptor.streams})
            return Verdict.no(f"{descriptor.layout}: native kernels need all streams on one GPU, got {devices}")
        return Verdict.yes(f"{descriptor.layout}: strided rows, vectors up to 16 B")

    def _launch(self, descriptor, chunk, num_tokens, blocks, gather, max_programs, device) -> None:
        import torch

        module = self.module()
        _, launches = self._tables.get(descriptor, num_tokens, chunk, lambda width: width)
        stream = torch.cuda.current_stream(device).cuda_stream
        op = module.gather if gather else module.scatter
        for item in launches:
            op(
                item.table.data_ptr(),
                item.n_streams,
                blocks.data_ptr(),
                chunk.data_ptr(),
                item.launch.width,
                item.launch.max_tiles,
                max_programs or 0,
                stream,
            )

    def staged_chunk(
        self,
        descriptor,
        num_tokens: int,
        ids: list[int],
        ids_host,
        ids_dev,
        staging,
        host,
        gather: bool,
        streams: tuple[int, int],
        slot_events: tuple[int, int],
        after: tuple[int, int] = (0, 0),
    ) -> None:
        """One chunk that fits one ``staging`` slot, in one native call: the flat block ``ids`` written into
        ``ids_host`` (pinned, room for them; keep it until the kernel stream ran this) and uploaded into ``ids_dev``,
        then engine -> ``staging`` -> ``host`` (gather) or ``host`` -> ``staging`` -> engine, the kernels on
        ``streams[0]`` and the host copy on ``streams[1]`` (raw handles). ``slot_events`` (filled, freed: raw
        events) hand the slot between them; the kernels first wait for the queued work of ``after`` (raw stream,
        raw event; event 0: no wait). See ops.h. The same kernels and copies as a gather or scatter followed or
        preceded by a copy, without the ~60 Python-level calls of issuing them and their ordering one by one (a
        one-chunk DeepSeek-V4 transfer spent twice its link time on the host, docs/performance.md)."""
        key = (id(descriptor), num_tokens, staging.data_ptr())
        hit = self._packed.get(key)
        if hit is None or hit[0] is not descriptor:
            hit = self._pack(key, descriptor, num_tokens, staging)
        _, _, packed, n_launches, nbytes = hit
        self.module().staged_chunk(
            packed.data_ptr(),
            n_launches,
            ids,
            ids_host.data_ptr(),
            ids_dev.data_ptr(),
            staging.data_ptr(),
            host.data_ptr(),
            nbytes,
            gather,
            *streams,
            *slot_events,
            *after,
        )

    def _pack(self, key, descriptor, num_tokens: int, staging):
        """The compiled launches of a one-call chunk as the native call's int64 rows, memoized per (descriptor,
        tokens, staging address); the entry holds the launches, so their device tables outlive the table cache's."""
        import torch

        _, launches = self._tables.get(descriptor, num_tokens, staging, lambda width: width)
        rows = [[item.table.data_ptr(), item.n_streams, item.launch.width, item.launch.max_tiles] for item in launches]
        if len(self._packed) > 64:
            self._packed.clear()
        packed = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        hit = self._packed[key] = (descriptor, launches, packed, len(launches), descriptor.canonical_bytes(num_tokens))
        return hit

    def memcpy_regions(
        self, dsts, srcs, sizes, batched: bool = True, max_batch: int = 0, overlap: bool = False
    ) -> None:
        """DMA: copy regions (int64 CPU tensors of addresses and sizes) on the current stream, no SMs; batched
        calls of at most ``max_batch`` regions (0: one call), ``overlap`` = PreferOverlapWithCompute."""
        import torch

        count = int(sizes.numel())
        stream = torch.cuda.current_stream().cuda_stream
        self.module().memcpy_batch(
            dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr(), count, stream, batched, max_batch, overlap
        )

    def memcpy_chunk(
        self,
        template,
        ids: list[int],
        chunk_ptr: int,
        to_host: bool,
        stream: int,
        after: tuple[int, int] = (0, 0),
        max_batch: int = 0,
        overlap: bool = False,
    ) -> None:
        """DMA of one chunk on the raw ``stream`` handle, first ordered after ``after`` (a raw (stream, event) pair:
        the stream's queued work, through the event; (0, 0): no wait): the template's regions
        (kvport.hal.transfer.regions) filled with the flat block ``ids`` and the chunk's address in one native pass,
        then batched copy-engine calls."""
        t = template
        self.module().memcpy_template(
            t.eng_base.data_ptr(),
            t.block_pos.data_ptr(),
            t.block_stride.data_ptr(),
            t.can_off.data_ptr(),
            t.size.data_ptr(),
            int(t.size.numel()),
            ids,
            chunk_ptr,
            to_host,
            stream,
            max_batch,
            overlap,
            *after,
        )


class CudaBackend(NativeBackend):
    name = "cuda"
    target = "cuda"


class HipBackend(NativeBackend):
    name = "hip"
    target = "hip"
