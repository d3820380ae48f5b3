"""docs/vllm.md's walk-through, verbatim: its model, server command and client blocks run as written (only the port
and directories replaced), against vLLM's real OpenAI server; then the server is restarted and the client's first
request is served from kvport's disk tier. One server at a time, each bounded in time and stopped after."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "vllm.md"
START_TIMEOUT_S = 420  # compiled start of the demo model took ~40-90 s on the 2-core VM; the rest is headroom
CHUNK = 256


def walkthrough_block(name: str) -> str:
    """The fenced block right after ``<!-- walkthrough:NAME -->`` in docs/vllm.md."""
    match = re.search(rf"<!-- walkthrough:{name} -->\s*```\w*\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"docs/vllm.md has no walkthrough:{name} block"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walkthrough:
    def __init__(self, root: Path) -> None:
        from kvport.demo.session import engine_env

        self.root = root
        self.port = _free_port()
        self.env = engine_env(root)
        self.env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
        # `python` in the blocks is this interpreter (the one with vLLM)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.starts = 0

    def text(self, block: str) -> str:
        text = walkthrough_block(block)
        text = text.replace("/tmp/kvport-demo-model", str(self.root / "model"))
        text = text.replace("/tmp/kvport-cache", str(self.root / "cache"))
        return text.replace("8000", str(self.port))

    def build_model(self) -> None:
        subprocess.run(["bash", "-c", self.text("model")], env=self.env, check=True, timeout=300)

    @contextlib.contextmanager
    def server(self):
        self.starts += 1
        log_path = self.root / f"server-{self.starts}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                ["bash", "-c", self.text("server")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self._healthy():
                assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"server not up in {START_TIMEOUT_S} s"
                time.sleep(2)
            yield log_path
        finally:
            _stop(proc)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                return True
        except OSError:
            return False

    def client(self) -> list[tuple[int, int]]:
        done = subprocess.run(
            [sys.executable, "-c", self.text("client")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [line.split(" ", 2) for line in done.stdout.splitlines()]
        return [(int(prompt), int(cached)) for prompt, cached, *_ in rows]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            return response.read().decode()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after 60 s (vLLM may ignore SIGTERM while it
    compiles)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _external_hits(metrics: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith("vllm:external_prefix_cache_hits_total")]
    assert lines, "vLLM's /metrics has no external_prefix_cache_hits_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_walkthrough_server_and_client_from_the_docs(tmp_path):
    walk = Walkthrough(tmp_path)
    walk.build_model()
    with walk.server() as log:
        (prompt, first), (_, second) = walk.client()
        assert first == 0
        assert second >= CHUNK, "the second question reuses the document (vLLM's own prefix cache)"
        assert _external_hits(walk.metrics()) == 0
    text = log.read_text()
    assert "kvport: bound" in text and "kvport: scheduler looks up 1 shard namespace(s)" in text
    listing = subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", "cache", "list", "--l2-path", str(tmp_path / "cache")],
        env=walk.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The shard's namespace in the shared key format: its model, no engine label, not marked as an earlier format.
    assert listing.returncode == 0 and "  model=" in listing.stdout, listing
    assert "(earlier key format)" not in listing.stdout, listing
    with walk.server():
        (prompt, first), _ = walk.client()
        assert first == (prompt - 1) // CHUNK * CHUNK, "after a restart the document's chunks come from kvport"
        assert _external_hits(walk.metrics()) >= first
