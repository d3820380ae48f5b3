"""`kvport demo`: builds a tiny random Llama, runs vLLM on CPU with and without kvport, prints what the cache saves.
Owns the demo's command line and its explanatory output; must not import vLLM or torch at module import."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        default=str(Path.home() / ".cache" / "kvport" / "demo"),
        help="model, disk cache and engine logs (default: ~/.cache/kvport/demo)",
    )
    parser.add_argument("--questions", type=int, default=4, help="questions asked after the shared document")
    parser.add_argument("--repeats", type=int, default=2, help="times each question is sent; TTFTs are medians")
    parser.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    parser.add_argument(
        "--shared",
        metavar="URL",
        help="a shared tier (redis://host:6379/0, mooncake://master:50051): the second kvport engine gets its own "
        "empty disk and reuses the first one's KV through this server only, as a second machine would",
    )


def run(args: argparse.Namespace) -> int:
    from kvport.bench.e2e import require_positive, write_json
    from kvport.demo.measure import Params, format_table, measure
    from kvport.demo.session import require_vllm

    require_vllm()
    require_positive(args, ("questions", "repeats"))
    if args.shared:
        from kvport.store.tiers import check_tier_spec

        check_tier_spec(args.shared, "--shared")  # a bad URL is one line before any engine starts
    params = Params(workdir=args.workdir, questions=args.questions, repeats=args.repeats, shared=args.shared)
    third = (
        "and a second kvport engine with its own empty L1 and disk that shares only the server given by --shared\n"
        "(as a second machine would)."
        if args.shared
        else "and restarted with kvport on the same disk cache."
    )
    print(
        "kvport demo: one long shared document (~3,200 tokens) followed by different questions, as an agent or\n"
        "RAG service sends them, on a small random-weight Llama served by vLLM on this CPU. Three fresh engines:\n"
        f"without kvport; with kvport and an empty cache; {third}\n"
        "vLLM's own prefix cache is off in all three, so every reuse shown here is kvport's.",
        flush=True,
    )
    result = measure(params, progress=lambda msg: print(f"  - {msg}", flush=True))
    write_json(result, args.json)
    print()
    print(format_table(result))
    print(f"\n(engine logs and the disk cache are in {args.workdir}; took {result['summary']['elapsed_s']:.0f} s)")
    return 0
