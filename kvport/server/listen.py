"""Where `kvport server` listens: the ROUTER socket with its limits, the ipc socket file's directory, mode and group,
and shared memory left behind by servers that were killed. Owns these file-system steps; must not handle requests."""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
from pathlib import Path

import zmq

from kvport.errors import UserError
from kvport.server import protocol as P
from kvport.server.address import ipc_path
from kvport.server.config import ServerConfig

log = logging.getLogger("kvport.server")


def bind_router(ctx: zmq.Context, config: ServerConfig) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # A frame larger than this drops its sender's connection inside libzmq: memory stays bounded whatever a
    # peer sends. Below it, oversized requests get an error reply (protocol limits).
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + P.MAX_HEADER_BYTES)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    address = config.address
    path = ipc_path(address)
    try:
        if path is not None:
            _prepare_ipc(path, config)
            old = os.umask(0o177)  # the socket file starts owner-only, then gets the configured mode
            try:
                sock.bind(address)
            finally:
                os.umask(old)
            os.chmod(path, config.mode)
            chown_to_group(path, config.group)
        else:
            sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close()
        raise UserError(f"server: cannot listen on {address}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _prepare_ipc(path: Path, config: ServerConfig) -> None:
    if path.parent.is_dir():
        owner = path.parent.stat().st_uid
        if owner not in (os.getuid(), 0):  # someone else's directory could swap the socket under us
            raise UserError(f"server: {path.parent} belongs to uid {owner}; put the socket in a directory you own")
    else:
        dir_mode = 0o700 | (0o010 if config.mode & 0o060 else 0)  # a group socket needs a group-searchable dir
        path.parent.mkdir(mode=dir_mode, parents=True)
        chown_to_group(path.parent, config.group)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise UserError(f"server: another process is serving on {path}; stop it or pick another address")
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
                raise UserError(f"server: {path}: {exc.strerror}") from None
            path.unlink(missing_ok=True)  # a socket left behind by a server that died
        finally:
            probe.close()


def chown_to_group(path: Path, group: str | None) -> None:
    if group is None:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise UserError(f"server config: group {group!r} does not exist") from None
    os.chown(path, -1, gid)


def remove_stale_arenas(shm_dir: str) -> None:
    """Shared memory left by servers that were killed (it would hold its memory until reboot)."""
    try:
        entries = list(Path(shm_dir).glob("kvport-*.l1"))
    except OSError:
        return
    for path in entries:
        pid = path.name.split("-")[1]
        try:
            owned = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
            log.info("kvport server: removed %s, left by a server that is gone", path)
