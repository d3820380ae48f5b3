"""The measurement engine behind `kvport bench kernels`: memcpy limits, each case timed alone and under GEMM load.
Owns timing with device events and the GEMM load loop; must not print tables (kernels.py does) or run on CPU."""

from __future__ import annotations

import math
import random
import statistics
import sys

import torch
from tqdm import tqdm

from kvport.bench._under_load import TRIALS, timed_window
from kvport.hal.platform import detect_platform
from kvport.hal.registry import candidates
from kvport.hal.transfer.executor import Transfer

GIB = 1 << 30
MAX_DMA_REGIONS = 1 << 17
LOAD_STEP_MS = 1.0  # one GEMM-load step (graph replay) lasts at least this long: ~100x its host launch cost


class SkipCase(Exception):
    """A case that is not measured, with the reason recorded in its place."""


class Bench:
    def __init__(
        self,
        layouts,
        tokens,
        directions,
        paths,
        loads,
        backends,
        repeat,
        dims,
        gemm_n,
        model=None,
        zero_copy_programs=None,
        whole_blocks=False,
    ) -> None:
        self.model, self.zero_copy_programs, self.whole_blocks = model, zero_copy_programs, whole_blocks
        self.layouts, self.tokens, self.directions = layouts, tokens, directions
        self.paths, self.loads, self.repeat, self.dims, self.gemm_n = paths, loads, repeat, dims, gemm_n
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.platform = detect_platform()
        self.backends = self._backends(backends)
        self.native = next((b for b in self.backends.values() if hasattr(b, "memcpy_regions")), None)
        self._memcpy_cache: dict = {}
        self._gemm_solo_ms: float | None = None
        self._load_graph, self.gemms_per_step = None, 1

    # -- setup ------------------------------------------------------------------------------------------------
    def _backends(self, names):
        from kvport.errors import UserError

        found = {c.name: c for c in candidates(self.platform)}
        wanted = names or [n for n, c in found.items() if c.verdict.ok]
        out = {}
        for name in wanted:
            cand = found.get(name)
            if cand is None or not cand.verdict.ok:
                why = cand.verdict.reason if cand else "unknown backend"
                raise UserError(f"--backend {name}: cannot run here ({why})")
            out[name] = cand.backend
        return out

    def _layouts(self):
        from kvport.layouts import allocate, catalog_names

        names = self.layouts or catalog_names()
        suffix = "+whole-blocks" if self.whole_blocks else ""
        for name in names:
            yield name + suffix, sized_layout(name, self.dims), allocate

    # -- limits -----------------------------------------------------------------------------------------------
    def _time(self, fn, reps: int) -> float:
        """Milliseconds per call of fn() issued back to back (after one warm-up), from device events.

        Back to back is how a connector moves a prefix, chunk after chunk, and it is how the memcpy limit is timed
        too; host-side issue cost shows up wherever the host cannot keep ahead of the device. A call may return a
        Completion: the window then ends when the last one finished entirely (its copy to the host included)."""
        fn()
        torch.cuda.synchronize()
        start, end = timed_window(fn, reps, _all_of_it)
        end.synchronize()
        return start.elapsed_time(end) / reps

    def _median_ms(self, fn, reps: int) -> float:
        """Median of TRIALS windows of ``reps`` calls, as under load: a slow window alone is not the path's."""
        return statistics.median(self._time(fn, reps) for _ in range(TRIALS))

    def _reps(self, ms_each: float) -> int:
        """Enough repetitions for a window of at least 40 ms (event resolution ~0.5 us, GEMMs of ~1.5 ms)."""
        return max(self.repeat, int(40.0 / max(ms_each, 1e-3)) + 1)

    def memcpy_gbps(self, direction: str, nbytes: int) -> float:
        key = (direction, nbytes)
        if key not in self._memcpy_cache:
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            other = (
                torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                if direction != "d2d"
                else torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            )
            src, dst = (dev, other) if direction == "d2h" else (other, dev)
            one = self._time(lambda: dst.copy_(src, non_blocking=True), 2)
            ms = self._median_ms(lambda: dst.copy_(src, non_blocking=True), self._reps(one))
            # D2D counts bytes read plus written, as DESIGN.md's 2926 GB/s does; host links count bytes moved.
            moved = 2 * nbytes if direction == "d2d" else nbytes
            self._memcpy_cache[key] = moved / ms / 1e6
        return self._memcpy_cache[key]

    def gemm_solo_ms(self) -> float:
        """One GEMM of the load, alone (ms); also captures the load's CUDA graph (``load_step``)."""
        if self._gemm_solo_ms is None:
            a = torch.randn(self.gemm_n, self.gemm_n, device=self.device, dtype=torch.bfloat16)
            b = torch.randn(self.gemm_n, self.gemm_n, device=self.device, dtype=torch.bfloat16)
            self._gemm = (a, b, torch.empty_like(a))
            self._gemm_solo_ms = self._time(lambda: torch.matmul(a, b, out=self._gemm[2]), 30)
            # The load is replayed from a graph of GEMMs lasting >= LOAD_STEP_MS: issued one by one, short GEMMs
            # (27 us at n=2048) finish as fast as the host issues them, so none would still be queued when the
            # transfers start and the load would not be a load.
            per_step = max(1, math.ceil(LOAD_STEP_MS / self._gemm_solo_ms))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(per_step):
                    torch.matmul(a, b, out=self._gemm[2])
            self._load_graph, self.gemms_per_step = graph, per_step
        return self._gemm_solo_ms

    def load_step(self) -> None:
        """Queue one step of the GEMM load (``gemms_per_step`` GEMMs) on the current stream."""
        self.gemm_solo_ms()
        self._load_graph.replay()

    # -- cases ------------------------------------------------------------------------------------------------
    def cases(self, layouts):
        kernels = [b for b in self.backends if b != "torch"]
        for name, spec, allocate in layouts:
            for tokens in self.tokens:
                for direction in self.directions:
                    rows = []
                    if direction == "d2d":
                        rows += [(b, "kernel") for b in kernels]
                    else:
                        for path in self.paths:
                            if path == "dma":
                                # The copy engines do the work: the same for every kernel backend, measured once.
                                rows.append(("copy-engine", "dma"))
                            else:
                                rows += [(b, path) for b in kernels]
                    # Baselines users compare against: the torch reference, and one copy per block.
                    rows.append(("torch", "kernel" if direction == "d2d" else "staged"))
                    if direction != "d2d" and self.native is not None:
                        rows.append(("per-block", "dma"))
                    for backend, path in rows:
                        for load in self.loads:
                            yield name, spec, allocate, tokens, direction, backend, path, load
                    if direction != "d2d" and "gemm" in self.loads:
                        # The GEMM column's baseline: one plain pinned copy of the same bytes under the same load.
                        yield name, spec, allocate, tokens, direction, "memcpy", "memcpy", "gemm"

    def run(self, on_record=None) -> dict:
        layouts = list(self._layouts())
        cases = list(self.cases(layouts))
        records = []
        kv_cache: dict = {}
        rng = random.Random(0)
        for case in tqdm(cases, desc="bench kernels", unit="case", file=sys.stderr):
            name, spec, allocate, tokens, direction, backend, path, load = case
            key = (name, tokens)
            if key not in kv_cache:
                kv_cache.clear()
                torch.cuda.empty_cache()
                groups = spec.groups
                need = [-(-tokens // g.tokens_per_block) for g in groups]
                # Twice the blocks needed, ids shuffled: engine block tables are not contiguous in practice.
                num_blocks = [2 * n + 2 for n in need]
                kv = allocate(spec, num_blocks if len(groups) > 1 else num_blocks[0], device=self.device, fill="zeros")
                for storage in kv.storages:
                    # Random bytes drawn on the GPU: drawing 2 GiB on the CPU took ~10 s per layout.
                    storage.random_(0, 256)
                ids = [rng.sample(range(nb), n) for nb, n in zip(num_blocks, need)]
                kv_cache[key] = (kv, ids)
            kv, ids = kv_cache[key]
            try:
                records.append(self.case(name, self._descriptor(kv), ids, tokens, direction, backend, path, load))
            except SkipCase as exc:
                records.append(self._case_key(name, backend, direction, tokens, path, load) | {"skipped": str(exc)})
            except Exception as exc:  # one failing case must not hide the others; the table shows it
                error = f"{type(exc).__name__}: {exc}"[:300]
                records.append(self._case_key(name, backend, direction, tokens, path, load) | {"error": error})
            if on_record is not None:
                on_record(records[-1], self.summary(records))
        return self.summary(records)

    def _descriptor(self, kv):
        if not self.whole_blocks:
            return kv.descriptor
        from kvport.layouts import LayoutError
        from kvport.layouts.whole_blocks import whole_blocks

        try:
            return whole_blocks(kv.descriptor)
        except LayoutError as exc:
            raise SkipCase(str(exc)) from None

    def summary(self, records) -> dict:
        return {
            "device": torch.cuda.get_device_name(self.device),
            "torch": torch.__version__,
            "dims": self.dims,
            "memcpy": {
                "d2h_gbps": self.memcpy_gbps("d2h", GIB),
                "h2d_gbps": self.memcpy_gbps("h2d", GIB),
                "d2d_gbps": self.memcpy_gbps("d2d", GIB),
            },
            "gemm": {
                "n": self.gemm_n,
                "solo_ms": self.gemm_solo_ms() if "gemm" in self.loads else None,
                "per_load_step": self.gemms_per_step,
            },
            "records": list(records),
        }

    def case(self, name, descriptor, ids, tokens, direction, backend_name, path, load) -> dict:
        nbytes = descriptor.canonical_bytes(tokens)
        engine = load in ("engine", "engine-async")
        if engine and (direction == "d2d" or backend_name == "per-block"):
            raise SkipCase("engine order times host transfers of the transfer pipeline only")
        if load == "engine-async" and direction != "d2h":
            raise SkipCase("loads are always ordered before the forward that reads them (--load engine)")
        used, enqueue = self._enqueue(
            descriptor,
            ids,
            tokens,
            direction,
            backend_name,
            path,
            nbytes,
            release_wait=load != "engine-async",
            engine_waits=load == "engine",
        )
        if engine:
            return (
                self._case_key(name, backend_name, direction, tokens, path, load)
                | self._engine_case(enqueue, direction, nbytes, release_wait=load == "engine")
                | dict(path_used=used)
            )
        if load == "gemm":
            ms, gemm_ratio = self._under_load(enqueue)
        else:
            one = self._time(enqueue, 2)
            ms, gemm_ratio = self._median_ms(enqueue, self._reps(one)), None
        moved = 2 * nbytes if direction == "d2d" else nbytes
        gbps = moved / ms / 1e6
        limit = self.memcpy_gbps(direction, nbytes)
        return self._case_key(name, backend_name, direction, tokens, path, load) | dict(
            path_used=used,
            bytes=nbytes,
            ms=ms,
            gbps=gbps,
            memcpy_gbps=limit,
            ratio_to_memcpy=gbps / limit,
            gemm_ratio=gemm_ratio,
        )

    def _engine_case(self, enqueue, direction: str, nbytes: int, release_wait: bool) -> dict:
        """One transfer per engine step in the engine's own order, against a plain copy issued the same way;
        ``gemm_ratio`` is the next step's speed beside the transfer (the first step's speed = 1)."""
        from kvport.bench._engine_order import engine_ordered, memcpy_enqueue

        self.gemm_solo_ms()  # captures the load step's graph
        # Rounds are apart (a host sync each) and reported as medians: at least 11 so a few slow rounds do not set
        # the figure (a choice, not a measurement; the runs in docs/performance.md used 11).
        reps = max(self.repeat, 11)
        ms, wait, speed = engine_ordered(self.load_step, enqueue, reps)
        plain = memcpy_enqueue(direction, nbytes, self.device, release_wait)
        ref_ms, ref_wait, _ = engine_ordered(self.load_step, plain, reps)
        return dict(
            bytes=nbytes,
            ms=ms,
            gbps=nbytes / ms / 1e6,
            memcpy_gbps=nbytes / ref_ms / 1e6,
            ratio_to_memcpy=ref_ms / ms,
            gemm_ratio=speed,
            engine_wait_ms=wait,
            memcpy_engine_wait_ms=ref_wait,
        )

    @staticmethod
    def _case_key(name, backend, direction, tokens, path, load) -> dict:
        """The fields that identify one record: (layout, backend, direction, tokens, path, load)."""
        return dict(layout=name, backend=backend, direction=direction, tokens=tokens, path=path, load=load)

    def _enqueue(
        self, descriptor, ids, tokens, direction, backend_name, path, nbytes, release_wait=True, engine_waits=False
    ):
        """(path actually used, a function that issues one transfer on the current stream's timeline and, with
        ``release_wait``, orders that stream after the transfer's use of engine memory); ``engine_waits``: the
        planner is told the engine's next step waits for that release (`--load engine`, as the vLLM worker tells
        it for loads)."""
        if direction == "d2d":
            backend = self.backends.get(backend_name) or _torch_backend()
            staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            return "kernel", lambda: backend.gather(descriptor, ids, staging, tokens)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if backend_name == "memcpy":
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            src, dst = (dev, host) if direction == "d2h" else (host, dev)
            return "memcpy", lambda: dst.copy_(src, non_blocking=True)
        if backend_name in ("per-block", "copy-engine"):
            from kvport.hal.transfer.regions import region_count

            count = region_count(descriptor, tokens)
            # One copy-engine call per region costs ~1-2 us of host and engine time: past this many regions a
            # single transfer takes seconds, and neither path is a candidate (the planner refuses it too).
            if count > MAX_DMA_REGIONS:
                raise SkipCase(f"{count} regions > {MAX_DMA_REGIONS}: copy-engine path not viable for this layout")
        if backend_name == "per-block":
            from kvport.hal.transfer.regions import regions

            eng, can, size = regions(descriptor, ids, tokens, host.data_ptr())
            dsts, srcs = (can, eng) if direction == "d2h" else (eng, can)

            def per_block():
                self.native.memcpy_regions(dsts, srcs, size, batched=False)

            return "dma", per_block
        if backend_name == "copy-engine":
            if self.native is None:
                raise RuntimeError("the DMA path needs the native module (memcpy_batch)")
            backend_name = next(iter(self.backends))
        backend = self.backends.get(backend_name) or _torch_backend()
        transfer = Transfer(backend, self.device, model=self.model, native=self.native)
        if self.zero_copy_programs:
            transfer.zero_copy_programs = self.zero_copy_programs
        chosen = transfer.plan(descriptor, tokens, direction, path, engine_waits=engine_waits).path

        def one():
            if direction == "d2h":
                result = transfer.to_host(descriptor, ids, host, tokens, path=chosen)
            else:
                result = transfer.from_host(host, descriptor, ids, tokens, path=chosen)
            # The timing stream waits as an engine would: until the transfer is done with its KV (_all_of_it ends
            # the window with the last byte). Asynchronous stores: vLLM keeps the blocks instead (no wait).
            if release_wait:
                result.completion.wait_on()
            return result.completion

        return chosen, one

    def _under_load(self, enqueue) -> tuple[float, float]:
        """(ms per transfer, GEMM speed ratio) under the GEMM load on another stream (kvport.bench._under_load)."""
        from kvport.bench._under_load import under_load

        step_ms = self.gemm_solo_ms() * self.gemms_per_step
        alone = self._time(enqueue, 2)
        reps = self._reps(alone)
        n_steps = int(alone * reps * 1.5 / step_ms) + 6  # load steps (graph replays) covering the window
        return under_load(enqueue, _all_of_it, self.load_step, reps, n_steps)


def sized_layout(name: str, dims: dict):
    """Catalog layout ``name`` at the benchmark's model size: the ``dims`` it has; layouts with groups that are not
    plain attention take only layers and dtype."""
    from kvport.layouts import load_layout

    spec = load_layout(name)
    have = dict(spec.dims)
    dims = {k: v for k, v in dims.items() if k in have}
    if any(g.kind != "attention" for g in spec.groups if not g.opaque):
        # MLA/DeepSeek layouts keep their own latent width (vllm-mla calls it head_dim=576).
        dims = {k: v for k, v in dims.items() if k in ("layers", "dtype")}
    return load_layout(name, **dims)


def _torch_backend():
    from kvport.hal.backends.torch_ref import TorchBackend

    return TorchBackend()


def _all_of_it(last) -> None:
    """The timing stream waits for all of the last transfer of a window (its copy to the host included): an
    engine's stream waits only until a store is done with its KV, while the window must end with the last byte.
    Transfers of one window run their copies in issue order, so the last one's end is the window's."""
    from kvport.hal.completion import Completion

    if isinstance(last, Completion):
        last.wait_on_all()
