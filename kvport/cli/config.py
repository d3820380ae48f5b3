"""`kvport config check [FILE]`: load a cache config as the connector would and check it against this machine.
Owns argument handling and printing only; the parsing and the checks live in kvport.cache.config."""

from __future__ import annotations

import argparse
import dataclasses
import os

from kvport.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION")
    check = sub.add_parser("check", help="validate a cache config (file, then KVPORT_* env) and print the settings")
    check.add_argument("file", nargs="?", help="YAML config (default: $KVPORT_CONFIG, else only env and defaults)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config_command", None) != "check":
        raise UserError("expected an action: check [FILE]")
    from kvport.cache.config import check_machine_limits, load_config

    config = load_config(args.file)
    path = args.file or os.environ.get("KVPORT_CONFIG")
    check_machine_limits(config, f"cache config {path}" if path else "cache config")
    from kvport.store.tiers import shown_spec

    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "tiers":  # never print a password
            value = tuple(shown_spec(spec) for spec in value)
        shown = "<set>" if not field.repr and value is not None else repr(value)  # secrets (server_token)
        print(f"{field.name:20} {shown}")
    return 0
