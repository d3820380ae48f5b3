"""Side by side in the engine's own order (an extension of side_by_side.py in this ignored copy, same workload):
per round a GEMM on the current stream (the engine's forward), one transfer after it, the next GEMM after what the
transfer makes the engine wait for (kvport: its release, `completion.wait_on`, as kvport's vLLM worker; LMCache's
ops and memcpy: their end, as side_by_side.py issues them). Medians over rounds: ms from the GEMM's end to the
transfer's last byte, and until the next GEMM may start. Every method is checked byte for byte first.
Needs ../shared/bench/side_by_side.py beside it (copy that folder to the git-ignored .sbs and this file into it; it
builds LMCache's ops there, never in the project). usage: python3 .sbs/sbs_engine_order.py [side_by_side args]
Raw output: docs/bench/side-by-side-engine-order-h200-{n,o}.json."""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402

ROUNDS = 15


def main() -> int:
    args = sbs.parse_args(sys.argv[1:])
    import torch

    t0 = time.time()
    device = torch.device("cuda", torch.cuda.current_device())
    built = (sbs.build_lmcache(args.build_dir), 0.0, None)
    print(f"LMCache ops built in {time.time() - t0:.0f} s", flush=True)
    wl = sbs.Workload(torch, device, args.tokens, args.seed)
    lmc, kvp = sbs.LmcacheSide(torch, wl, args, built), sbs.KvportSide(torch, wl, args)
    if lmc.error or kvp.error:
        print("setup error:", lmc.error, kvp.error)
        return 1
    runner = sbs.Runner(torch, args, wl, time.time())
    runner.kvp, runner.side_stream_owners = kvp, [lmc]
    side = torch.cuda.Stream(device)
    out = []
    for tokens in sorted(args.tokens, reverse=True):
        for direction in args.direction:
            methods = [
                m
                for m in sbs.build_methods(args, wl, kvp, lmc, direction, tokens)
                if m.name
                in ("memcpy", "kvport auto", "kvport cuda staged", "kvport dma", "lmcache inproc", "lmcache mp-direct")
            ]
            engine_fns = {}
            for m in methods:
                m.fn = m.make()
                m.fn()
                m.fn()
                torch.cuda.synchronize()
                if m.order is not None:
                    m.correct, m.check = runner.check(m)
                if m.impl == "kvport":
                    transfer = m.fn.keep
                    # The next GEMM waits for the release: the planner is told so, as the vLLM worker tells it.
                    requested = m.name.split()[-1] if m.name != "kvport auto" else "auto"
                    path = transfer.plan(kvp.descriptor, tokens, direction, requested, engine_waits=True).path
                    desc, ids, host = kvp.descriptor, wl.ids(tokens), wl.host(direction, tokens)

                    def engine_fn(
                        transfer=transfer, path=path, desc=desc, ids=ids, host=host, direction=direction, tokens=tokens
                    ):
                        if direction == "d2h":
                            res = transfer.to_host(desc, ids, host, tokens, path=path)
                        else:
                            res = transfer.from_host(host, desc, ids, tokens, path=path)
                        res.completion.wait_on()  # the vLLM worker's order
                        return res.completion

                    engine_fns[m.name] = (engine_fn, path)
            times = {m.name: ([], []) for m in methods}
            for r in range(ROUNDS + 2):  # interleaved; the first two rounds warm up
                for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
                    ready, done, resume = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                    runner.gemm()
                    ready.record()
                    fn = engine_fns.get(m.name, (m.fn, None))[0]
                    completion = fn()
                    resume.record()
                    side.wait_event(ready)
                    if completion is not None and hasattr(completion, "wait_on_all"):
                        completion.wait_on_all(side)
                    else:
                        side.wait_stream(torch.cuda.current_stream())
                    done.record(side)
                    runner.gemm()
                    torch.cuda.synchronize()
                    if r >= 2:
                        times[m.name][0].append(ready.elapsed_time(done))
                        times[m.name][1].append(ready.elapsed_time(resume))
            ref = statistics.median(times["memcpy"][0])
            for m in methods:
                last, wait = (statistics.median(x) for x in times[m.name])
                path = engine_fns.get(m.name, (None, ""))[1] or ""
                row = dict(
                    tokens=tokens,
                    direction=direction,
                    method=m.name,
                    path=path,
                    correct=m.correct,
                    last_byte_ms=last,
                    ratio=ref / last,
                    next_step_waits_ms=wait,
                )
                out.append(row)
                print(
                    f"{tokens:5d} {direction} {m.name:20s} {path:7s} correct={m.correct} last byte {last:8.3f} ms "
                    f"({ref / last:6.3f})  next GEMM waits {wait:8.3f} ms",
                    flush=True,
                )
            for m in methods:
                m.fn = None
            torch.cuda.empty_cache()
    gemm = {"n": args.gemm_n, "solo_ms": runner.gemm_ms}
    sbs.atomic_write(args.out / "engine_order.json", json.dumps({"gemm": gemm, "rows": out}, indent=1) + "\n")
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
