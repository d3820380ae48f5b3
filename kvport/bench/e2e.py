"""`kvport bench e2e`: time to first token with and without kvport on a real vLLM engine, with parameters and --json.
Owns the command-line surface of the measurement in kvport.demo.measure; must not import vLLM or torch at import."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvport.demo.measure import Params
    from kvport.demo.model import ModelDims

    p, d = Params(workdir=""), ModelDims()
    parser.add_argument("--workdir", help="where the model, disk cache and engine logs go (default: a temp dir)")
    parser.add_argument("--prefix-words", type=int, default=p.prefix_words, help="shared prefix length (~1.08 tok/w)")
    parser.add_argument("--question-words", type=int, default=p.question_words, help="words per question")
    parser.add_argument("--questions", type=int, default=p.questions, help="questions after the shared prefix")
    parser.add_argument("--repeats", type=int, default=p.repeats, help="times each question is sent (median)")
    parser.add_argument("--max-tokens", type=int, default=p.max_tokens, help="tokens generated per question")
    parser.add_argument("--chunk-tokens", type=int, default=p.chunk_tokens, help="kvport chunk size")
    parser.add_argument(
        "--max-batched-tokens", type=int, default=p.max_batched_tokens, help="vLLM per-step token budget (all engines)"
    )
    parser.add_argument("--layers", type=int, default=d.layers, help="model layers")
    parser.add_argument("--hidden", type=int, default=d.hidden, help="model hidden size")
    parser.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=d.kv_heads, help="KV heads")
    parser.add_argument("--intermediate", type=int, default=d.intermediate, help="MLP size")
    parser.add_argument("--timeout", type=float, default=p.timeout_s, help="seconds per engine process")
    parser.add_argument("--json", metavar="PATH", help="write the full result as JSON ('-' for stdout)")


def require_positive(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """A UserError naming the first flag among ``names`` whose value is below 1 (shared with `kvport demo`)."""
    from kvport.errors import UserError

    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")


def params_from_args(args: argparse.Namespace, workdir: str):
    from kvport.demo.measure import Params
    from kvport.demo.model import ModelDims
    from kvport.errors import UserError

    require_positive(
        args,
        ("prefix_words", "question_words", "questions", "repeats", "max_tokens", "chunk_tokens", "max_batched_tokens"),
    )
    # Zero heads would divide by zero below; a zero MLP width only fails inside the engine process.
    require_positive(args, ("layers", "hidden", "heads", "kv_heads", "intermediate"))
    if args.timeout <= 0:
        raise UserError(f"--timeout={args.timeout}: expected a positive number of seconds")
    # ~1.09 tokens per word (a period every 12 words); the engines run with max_model_len 8192.
    if (args.prefix_words + args.question_words + 2) * 1.09 + args.max_tokens > 8000:
        raise UserError(
            f"--prefix-words {args.prefix_words} + --question-words {args.question_words}: over 8000 tokens"
        )
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise UserError(f"--hidden {args.hidden} / --heads {args.heads} / --kv-heads {args.kv_heads} must divide")
    head_dim = args.hidden // args.heads
    if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
        raise UserError(f"--hidden/--heads gives head size {head_dim}; vLLM's CPU attention needs 32, 64, ... 256")
    dims = ModelDims(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
    )
    return Params(
        workdir=workdir,
        prefix_words=args.prefix_words,
        question_words=args.question_words,
        questions=args.questions,
        repeats=args.repeats,
        max_tokens=args.max_tokens,
        chunk_tokens=args.chunk_tokens,
        max_batched_tokens=args.max_batched_tokens,
        dims=dims,
        timeout_s=args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    from kvport.demo.measure import format_table, measure
    from kvport.demo.session import require_vllm

    require_vllm()
    params = params_from_args(args, args.workdir or "")
    if not params.workdir:  # created only once the flags are valid, so a typo leaves no empty dir behind
        params = dataclasses.replace(params, workdir=tempfile.mkdtemp(prefix="kvport-e2e-"))
    quiet = args.json == "-"
    result = measure(params, progress=None if quiet else lambda msg: print(f"kvport: {msg}", flush=True))
    write_json(result, args.json)
    if not quiet:
        print(format_table(result))
    return 0


def write_json(result: dict, where: str | None) -> None:
    if not where:
        return
    text = json.dumps(result, indent=2)
    if where == "-":
        sys.stdout.write(text + "\n")
        return
    path = Path(where)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
