"""One JSON stats file per engine process side (scheduler, worker N), replaced atomically: for tests, the demo and
dashboards. Owns the temp-name-then-rename write and the sweep of temps left by dead processes; not what is counted."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

# One writer at a time per process (an engine's scheduler and a worker may share the process).
_LOCK = threading.Lock()


class StatsFile:
    """``write(name, payload)`` puts JSON in ``directory/name``: made first, written to ``.<name>.<pid>.tmp``, renamed.
    The temp name is fixed per process, so a process killed mid-write (vLLM stops its workers at shutdown) leaves at
    most one, which the next writer of that file removes once its process is gone; a failed write removes its own."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._swept: set[str] = set()

    def write(self, name: str, payload: Any) -> None:
        text = json.dumps(payload, default=str)
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        with _LOCK:
            self.directory.mkdir(parents=True, exist_ok=True)
            if name not in self._swept:
                _remove_dead_temps(self.directory, name)
                self._swept.add(name)
            try:
                tmp.write_text(text)
                os.replace(tmp, self.directory / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise


def _remove_dead_temps(directory: Path, name: str) -> None:
    for path in directory.glob(f".{name}.*.tmp"):
        pid = path.name[len(name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
