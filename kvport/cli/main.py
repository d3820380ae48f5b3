"""Entry point of the `kvport` command: builds the parser from the subcommand table and maps user errors to exit 2.
Owns only dispatch; each subcommand lives in its own module and is imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvport.errors import UserError

# subcommand -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("kvport.cli.doctor", "show the platform, the native module and the copy backends with their reasons"),
    "layout": ("kvport.cli.layout", "list, show and check KV layout specs"),
    "config": ("kvport.cli.config", "check a cache config file against this machine and print its settings"),
    "cache": ("kvport.cli.cache", "list, count and clear what the cache tiers hold, per namespace"),
    "selftest": ("kvport.cli.selftest", "round-trip every layout through a backend and compare bytes"),
    "bench": ("kvport.cli.bench", "benchmarks: kernels, storage, e2e"),
    "demo": ("kvport.cli.demo", "run a real vLLM engine with kvport and show what the cache saves"),
    "server": ("kvport.cli.server", "the node cache server shared by every engine process: run, status"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvport", description="KV-cache layer for LLM inference engines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        module = _load(module_name)
        if module is not None:
            module.add_arguments(sub_parser)
    return parser


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # subcommand not shipped in this build
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = _load(args._module)
    if module is None:
        print(f"kvport {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"kvport {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvport {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
