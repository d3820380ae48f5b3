"""The transfer planner: picks DMA, staged or zero-copy per transfer from a cost model the benchmark calibrates.
Owns the cost model and the choice with its reason; must not move data (executor.py does) or import torch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kvport.hal.transfer.regions import region_count
from kvport.layouts.descriptor import CopyDescriptor

PATHS = ("dma", "staged", "zero-copy")
DIRECTIONS = ("d2h", "h2d")


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per transfer = sums of the terms below. Defaults are the H100 figures of DESIGN.md (PCIe Gen5 x16,
    torch 2.11); `kvport bench kernels --json` measures them again and `from_bench` loads that file."""

    link_gbps: float = 55.0  # pinned cudaMemcpy, 1 GiB, either direction
    d2d_gbps: float = 2926.0  # D2D memcpy counting read + write
    # Host time per region of a batched copy-engine call: the driver describes each region on the calling thread,
    # busy engines or not, and the engines move no faster than they are described. H200 VM, CUDA 13 driver 580,
    # 2026-11-29 (docs/performance.md, "the copy engines' two speeds"): 0.46-0.95 us per region, varying within one
    # process; with the stream held by a kernel while the host described 1024 regions of 32 KiB, the engines then
    # moved them at 54 GB/s. So a 32 KiB region costs 0.6-0.9 us of host for 0.6 us of link: the two speeds
    # (~54 and ~36 GB/s) of 256-token NHD chunks are the host's. Later measured: they follow the vCPU's own speed (a
    # fixed pure-Python loop took 2.67 ms in fast windows and 4.40 ms in slow ones, corr 0.88 with the driver's
    # time; docs/performance.md, "2026-11-30, eleventh stop").
    region_us_d2h: float = 0.6
    region_us_h2d: float = 0.6
    # Host time per region where the native build has no batched call and issues one async copy per region (HIP
    # before ROCm 7.14, CUDA before 12.8): one cudaMemcpyAsync per 32 KiB region cost 2.3-2.8 us on the H200 (1024
    # regions: 2.3-2.8 ms, same measurement). hipMemcpyAsync was not measured (no AMD GPU here).
    region_us_unbatched: float = 2.5
    # So the DMA path is taken only for regions at least this large (mean bytes per region, per direction): 1024
    # regions of 32 KiB per 256-token NHD chunk reached 0.98-0.99 of memcpy when the host was fast; 18 KiB MLA
    # regions only 0.58-0.71 (D2H) and 0.10-0.23 (H2D). Smaller rows go through SM kernels.
    dma_min_region_bytes_d2h: int = 32 << 10
    dma_min_region_bytes_h2d: int = 32 << 10
    # ...and only for moves of fewer regions than this; larger ones are staged. 8K-token NHD moves (1 GiB, 32768
    # regions) on four H200 machines, 2026-11-29 (docs/performance.md): the copy engines reached 0.98, 0.59, 0.65-0.96
    # and 0.56-0.88 of memcpy alone (the host's describing speed, above) and held the issuing thread for the whole move
    # (15-31 ms); the staged path 0.97-0.99 alone and 0.91-0.98 under load on every machine (it costs the GEMM ~3%), for
    # ~0.1 ms of host per piece. One or a few chunks stay on the copy engines: under load a single 256-token chunk kept
    # 0.47-0.97 there and 0.37-0.40 staged (its kernel waits for SMs). The crossover between 32 MiB and 1 GiB was not
    # measured: 512 MiB is two staged pieces, the least at which the pipeline overlaps one piece's wait for SMs with
    # another's copy. Counted in regions, not bytes: what varied was the host describing regions, so 16384 is the old
    # 512 MiB of 32 KiB NHD regions, and a whole-block move (kvport.layouts.whole_blocks: 8K tokens of Llama-3-8B are
    # 512 regions of 2 MiB) stays on the copy engines at any size.
    dma_max_move_regions: int = 16384
    launch_us: float = 8.0  # one kernel launch plus its event, from the host
    dma_call_us: float = 8.0  # one batched copy call (or the first of many) before the engines start moving
    # SM kernels through mapped host memory reached 95% of the link (DESIGN.md prototype, NHD).
    zero_copy_efficiency: float = 0.95
    # Zero-copy occupies SMs for the whole transfer and slows the engine (GEMM at 49-75% of solo speed), so it is
    # only for transfers short enough that latency matters more: 4 MiB is ~75 us of link time.
    zero_copy_max_bytes: int = 4 << 20
    # Staged pipeline piece. Under a GEMM load (H100, NHD/HND 8192 tokens) 16 MiB pieces kept 54-60% of memcpy and
    # 64 MiB 87-96%, 256 MiB 90-100% (GEMM 91-93%): each piece's kernel waits for SMs behind the engine's
    # kernels, so fewer, larger pieces stall the copy engine less. Alone all sizes reached 98-99%.
    piece_bytes: int = 256 << 20
    # ...but a move is cut into at least ``staging_buffers`` pieces while they stay this large, so copying one piece
    # overlaps gathering the next. H200, 2026-11-29, one run (docs/performance.md): DeepSeek V4 at 8K tokens (191
    # MiB, one 256 MiB piece, gather at 1.8 TB/s then copy) 0.930 / 0.937 of memcpy alone; in 64 MiB pieces 0.964 /
    # 0.970, under load equal (0.71-0.72); 32 MiB pieces lost under load (0.54-0.60); MLA (288 MiB) within +-0.01.
    min_piece_bytes: int = 64 << 20
    # Ring depth of staging buffers: lets kernels run pieces ahead when an engine kernel holds the SMs a while.
    staging_buffers: int = 3
    # DMA path: regions per cudaMemcpyBatchAsync call (0: one call per chunk), and whether calls carry
    # cudaMemcpyFlagPreferOverlapWithCompute. Settings under test with `kvport bench kernels --dma-batch/--dma-flags`.
    dma_batch_regions: int = 0
    dma_overlap: bool = False

    def piece_bytes_for(self, nbytes: int) -> int:
        """Staged piece size for a move of ``nbytes``: ``piece_bytes``, or smaller down to ``min_piece_bytes`` so
        that the move has ``staging_buffers`` pieces to pipeline (never above ``piece_bytes``)."""
        spread = -(-nbytes // max(self.staging_buffers, 1))
        return min(self.piece_bytes, max(self.min_piece_bytes, spread))

    @classmethod
    def from_bench(cls, path: Path) -> CostModel:
        """Calibrate from a `kvport bench kernels --json` file (memcpy figures of that device)."""
        data = json.loads(Path(path).read_text())
        memcpy = data.get("memcpy", {})
        link = [v for k, v in memcpy.items() if k in ("d2h_gbps", "h2d_gbps") and v]
        fields = {}
        if link:
            fields["link_gbps"] = min(link)
        if memcpy.get("d2d_gbps"):
            fields["d2d_gbps"] = memcpy["d2d_gbps"]
        return dataclasses.replace(cls(), **fields)


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str
    reason: str
    estimates_s: dict[str, float]


def unbatched_floor_bytes(model: CostModel) -> int:
    """The least region the copy engines keep up with when every region is its own copy call: its link time equals
    the host's time per call."""
    return round(model.region_us_unbatched * 1e-6 * model.link_gbps * 1e9)


def estimate(model: CostModel, path: str, nbytes: int, regions: int, direction: str, dma_batched: bool = True) -> float:
    link = nbytes / (model.link_gbps * 1e9)
    if path == "dma":
        per = model.region_us_d2h if direction == "d2h" else model.region_us_h2d
        if not dma_batched:
            per = model.region_us_unbatched
        # The engines copy while the host describes the next regions: the slower of the two sets the pace.
        return max(link, regions * per * 1e-6) + model.dma_call_us * 1e-6
    if path == "staged":
        piece = model.piece_bytes_for(nbytes)
        pieces = max(1, -(-nbytes // piece))
        first_piece = 2 * min(nbytes, piece) / (model.d2d_gbps * 1e9)
        return link + first_piece + pieces * 2 * model.launch_us * 1e-6
    if path == "zero-copy":
        return nbytes / (model.link_gbps * model.zero_copy_efficiency * 1e9) + model.launch_us * 1e-6
    raise ValueError(f"unknown path {path!r}")


def plan(
    descriptor: CopyDescriptor,
    num_tokens: int,
    direction: str,
    allowed: dict[str, str],
    path: str = "auto",
    model: CostModel | None = None,
    chunks: int = 1,
    dma_batched: bool = True,
    engine_waits: bool = False,
) -> Plan:
    """Choose a path for ``chunks`` chunks of ``num_tokens`` tokens moved as one transfer. ``allowed`` maps each
    path to "" when it can run or to the reason it cannot; ``dma_batched`` says whether the DMA path describes its
    regions in batched calls (else one copy call per region: kvport.kernels.cuda.memcpy_batch). ``engine_waits``:
    the engine orders its next work after this move's release: then the staged path, which gives engine memory
    back first (a store after its last gather, a load once its scatters ran: its copies into staging run before the
    engine's work ends; kvport.hal.transfer.staged, one_call)."""
    model = model or CostModel()
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    nbytes = chunks * descriptor.canonical_bytes(num_tokens)
    regions = chunks * region_count(descriptor, num_tokens)
    est = {p: estimate(model, p, nbytes, regions, direction, dma_batched) for p in PATHS}
    if path != "auto":
        if path not in PATHS:
            raise ValueError(f"path must be auto or one of {PATHS}, got {path!r}")
        if allowed.get(path):
            raise ValueError(f"path {path} cannot run: {allowed[path]}")
        return Plan(path, "requested", est)
    usable = [p for p in PATHS if not allowed.get(p)]
    if not usable:
        raise ValueError("no transfer path can run: " + "; ".join(f"{p}: {allowed[p]}" for p in PATHS))
    floor = batched_floor = model.dma_min_region_bytes_d2h if direction == "d2h" else model.dma_min_region_bytes_h2d
    calls = "batched calls"
    if not dma_batched:
        # One call per region: the engines keep up with the link only when a region's link time covers the host's
        # time per call (2.5 us x 55 GB/s: regions of ~134 KiB); 32 KiB NHD rows would run at a quarter of it.
        floor = max(floor, unbatched_floor_bytes(model))
        calls = "one copy call per region (this build has no batched memcpy)"
    mean_region = nbytes / max(regions, 1)
    if engine_waits and "staged" in usable:
        # The copy engines read or write engine memory to their last byte; a staged move gives it back after its
        # gathers or scatters and copies through its own staging. H200, `kvport bench kernels --load engine`
        # (docs/performance.md): the next step waited 0.02-0.04 ms per 256-token chunk staged against 0.62-0.64
        # ms on the copy engines (Llama-3-8B NHD), both directions; 2048 tokens: 0.17 ms / 4.0 ms against 6.4 /
        # 8.0 ms (d2h / h2d, side by side).
        return Plan("staged", f"{nbytes} B: the engine waits for this move's release; staged releases first", est)
    large = regions >= model.dma_max_move_regions and "staged" in usable
    if "dma" in usable and mean_region >= floor and not large:
        # The copy engines and no SM time taken from the engine: under load the SM kernels of a chunk-sized move
        # wait for SMs the engine's kernels hold.
        return Plan(
            "dma", f"{nbytes} B in {regions} regions of {mean_region:.0f} B >= {floor} B: copy engines, {calls}", est
        )
    if "dma" in usable and len(usable) > 1:
        # Regions below the size the copy engines keep up with, or a move large enough that the staged pipeline's
        # steady speed beats the copy engines' machine-to-machine spread (CostModel.dma_max_move_regions).
        usable.remove("dma")
    if nbytes > model.zero_copy_max_bytes and "zero-copy" in usable and len(usable) > 1:
        usable.remove("zero-copy")  # would hold SMs for the whole transfer and slow the engine
    if not usable:
        raise ValueError("no transfer path can run: " + "; ".join(f"{p}: {allowed[p]}" for p in PATHS))
    best = min(usable, key=lambda p: est[p])
    why = ", ".join(f"{p} {est[p] * 1e3:.3f} ms" for p in usable)
    if best != "dma" and not dma_batched and not allowed.get("dma") and batched_floor <= mean_region < floor:
        why += f"; copy engines skipped for regions under {floor} B: {calls}"
    return Plan(best, f"{nbytes} B in {regions} regions; estimates: {why}", est)
