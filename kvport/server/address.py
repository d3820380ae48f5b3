"""Server addresses: ``ipc:///path/to.sock`` (the default transport) or ``tcp://127.0.0.1:PORT`` (loopback only).
Owns parsing and the loopback rule; must not open sockets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from kvport.errors import UserError

LOOPBACK_NAMES = ("localhost",)


def check_address(address: str, where: str) -> str:
    """The address unchanged, or a UserError naming ``where``. TCP must stay on loopback: the socket carries no
    encryption, and where shared memory cannot be mapped it carries KV bytes."""
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if not path.startswith("/") or path.endswith("/"):
            raise UserError(f"{where}: {address!r}: expected ipc:///absolute/path/to/socket")
        return address
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"{where}: {address!r}: expected tcp://127.0.0.1:PORT")
        if not is_loopback(host):
            raise UserError(f"{where}: {address!r}: the server speaks TCP on loopback only (127.0.0.1, ::1)")
        return address
    raise UserError(f"{where}: {address!r}: expected ipc:///path/to.sock or tcp://127.0.0.1:PORT")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ipc_path(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


def probe_ipc(address: str) -> OSError | None:
    """Try to connect to an ipc address's unix socket: None when that works (or the address is not ipc), else the
    error (FileNotFoundError: no socket; ConnectionRefusedError: nothing listens; PermissionError: its mode)."""
    import socket

    path = ipc_path(address)
    if path is None:
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc
    finally:
        probe.close()
    return None


def require_zmq() -> None:
    """A one-line UserError when pyzmq (the server's transport) is not installed."""
    import importlib.util

    if importlib.util.find_spec("zmq") is None:
        raise UserError("kvport server needs pyzmq: pip install 'kvport[server]' (or pyzmq)")
