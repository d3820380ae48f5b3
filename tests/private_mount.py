"""Run a command in a private user and mount namespace (``unshare -rm``) after mount commands, so a test gets a real
small tmpfs (a disk that fills) or a real read-only bind mount without root; the test skips where that is not allowed.
(Tests run as root on the dev VM, where chmod restricts nothing: only a mount makes a directory truly read-only.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python_in_private_mount(mounts: Sequence[str], script: Path, *args: str, timeout: float = 180):
    """``python script *args`` (PYTHONPATH = this checkout) after ``mounts`` (shell commands) in a private namespace;
    the CompletedProcess (text). Skips the test when the namespace or a mount cannot be made here."""
    setup = " && ".join(mounts) or "true"
    shell = f'{{ {setup}; }} || exit 99\nexec "$@"\n'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KVPORT_CONFIG", None)
    argv = ["unshare", "-rm", "sh", "-c", shell, "sh", sys.executable, str(script), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        pytest.skip("no unshare(1) here")
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot make a private mount here: {proc.stderr.strip()}")
    return proc
