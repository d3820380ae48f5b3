"""`kvport server run|status`: run the node server in the foreground, or print a running server's figures.
Owns argument handling, signal handling and printing; the server lives in kvport.server.service."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from kvport.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="server_command", metavar="ACTION")
    run = sub.add_parser("run", help="serve the node cache in the foreground until SIGINT/SIGTERM")
    run.add_argument("--config", help="YAML with `server:` and `cache:` sections (docs/server.md)")
    run.add_argument(
        "--address", help="ipc:///path/to.sock (default under $XDG_RUNTIME_DIR or /tmp) or tcp://127.0.0.1:N"
    )
    run.add_argument("--l1-bytes", help="shared L1 size, e.g. 8GiB (overrides the config)")
    run.add_argument("--metrics-port", type=int, help="serve /metrics and /health on 127.0.0.1:PORT")
    status = sub.add_parser("status", help="print a running server's hit rate, tokens saved, tiers and latency")
    status.add_argument("--address", help="the server's address (default: as `run` would pick)")
    status.add_argument("--token", help="access token, if the server requires one (or KVPORT_SERVER_TOKEN)")
    status.add_argument("--json", action="store_true", help="print the raw figures as JSON")


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "server_command", None)
    if command in ("run", "status"):
        from kvport.server.address import require_zmq

        require_zmq()
    if command == "run":
        return _run(args)
    if command == "status":
        from kvport.server.status import print_status

        return print_status(args.address, args.token, args.json)
    raise UserError("expected an action: run or status")


def _run(args: argparse.Namespace) -> int:
    from kvport.server.config import load_server_config

    cache_overrides = {}
    server, cache = load_server_config(args.config, {"address": args.address})
    if args.l1_bytes is not None or args.metrics_port is not None:
        import dataclasses

        from kvport.cache.config import parse_bytes

        if args.l1_bytes is not None:
            cache_overrides["l1_bytes"] = parse_bytes(args.l1_bytes, "--l1-bytes")
        if args.metrics_port is not None:
            cache_overrides["metrics_port"] = args.metrics_port
        cache = dataclasses.replace(cache, **cache_overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvport.server.service import Server

    srv = Server(server, cache)
    try:
        if cache.metrics_port is not None:
            from kvport.store.metrics import serve_metrics

            serve_metrics(cache.metrics_port, cache.metrics_host, health=srv.health)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: srv.stop())
        print(
            f"kvport server: serving on {server.address} (L1 {cache.l1_bytes} bytes in {srv.arena.path}, "
            f"{len(srv.tiers)} tier(s)"
            + (f", metrics on http://{cache.metrics_host}:{cache.metrics_port}/metrics" if cache.metrics_port else "")
            + ")",
            flush=True,
        )
        srv.serve_forever()
    finally:
        srv.close()
    print("kvport server: stopped", file=sys.stderr)
    return 0


def _dump(data) -> str:
    return json.dumps(data, indent=1, sort_keys=True)
