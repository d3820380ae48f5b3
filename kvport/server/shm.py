"""The server's shared L1 memory: one file in a memory filesystem (/dev/shm), created by the server and mapped by
every client. Owns creation (permissions, reserved pages), mapping and unlinking; must not know slots or chunks."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from kvport.errors import UserError

if TYPE_CHECKING:
    import torch


class SharedArena:
    """``nbytes`` of shared memory as a uint8 tensor (``tensor``); the creator unlinks the file at ``close``.

    The creator reserves every page up front (posix_fallocate): a memory filesystem grants sparse files lazily and
    a later page fault that finds it full kills the process with SIGBUS, so a too-large L1 fails at start instead.
    """

    def __init__(self, path: Path, fd: int, nbytes: int, owner: bool) -> None:
        self.path, self.nbytes, self.owner = path, nbytes, owner
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # fault every page in now, not in a copy
            self._map = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        import torch

        self.tensor: torch.Tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self.registered = False

    @classmethod
    def create(cls, directory: str | os.PathLike, name: str, nbytes: int, mode: int) -> SharedArena:
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise UserError(f"server: cannot create shared memory {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what the operator chose
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise UserError(
                f"server: cannot reserve {nbytes} bytes of shared memory in {directory} ({exc.strerror}); "
                "lower l1_bytes or enlarge the filesystem"
            ) from None
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, nbytes, owner=True)

    @classmethod
    def attach(cls, path: str | os.PathLike, nbytes: int) -> SharedArena:
        """Map a server's arena; OSError when this process may not (permissions, another mount namespace)."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != nbytes:
            os.close(fd)
            raise OSError(f"{path} is not the server's shared memory ({info.st_size} bytes, expected {nbytes})")
        return cls(path, fd, nbytes, owner=False)

    def offset_of(self, tensor: torch.Tensor) -> int:
        """Byte offset of a view of this arena (what travels on the wire instead of the bytes)."""
        offset = tensor.data_ptr() - self.tensor.data_ptr()
        if not 0 <= offset <= self.nbytes - tensor.numel():
            raise ValueError("tensor is not a view of this arena")
        return offset

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        if not (0 <= offset and 0 < nbytes and offset + nbytes <= self.nbytes):
            raise ValueError(f"slot [{offset}, {offset + nbytes}) outside the arena of {self.nbytes} bytes")
        return self.tensor[offset : offset + nbytes]

    def close(self) -> None:
        """Unlink (creator). The mapping itself lives until every tensor viewing it is gone: a transfer still
        reading a slot never faults."""
        if self.owner:
            self.path.unlink(missing_ok=True)
