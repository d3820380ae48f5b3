"""Real vLLM (CPU build) in its default multi-process mode with kvport through a real `kvport server`, no disk tier:
repeated prefixes hit, a second engine loads what the first computed, the engine keeps serving while the server is
down at start and after it was killed, tensor parallel 2. Outputs are compared with runs without kvport."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvport.server.spawn import ServerProcess

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.servers,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (nox -s e2e)"),
]

HERE = Path(__file__).resolve().parent
CHUNK = 256
DIMS = {"layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "vocab": 512}
# vLLM's CPU workers bind their OpenMP threads to NUMA nodes; this machine kind has one, so two ranks get one core
# each explicitly (without it: "Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers").
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


class Engines:
    def __init__(self, root: Path) -> None:
        from kvport.demo.model import ModelDims, build_model, make_text

        self.root = root
        self.model = str(build_model(root / "model", ModelDims(**DIMS)))
        prefix = make_text(700, seed=31)
        self.prompts = [f"{prefix} {make_text(20, seed=200 + q)}" for q in range(4)]

    def start(self, name: str, steps: list, kvport: dict | None, tp: int = 1) -> tuple[subprocess.Popen, Path]:
        from kvport.demo.session import engine_env

        work = self.root / name
        work.mkdir(parents=True, exist_ok=True)
        if kvport is not None:
            kvport = {"chunk_tokens": CHUNK, "stats_dir": str(work / "stats"), **kvport}
        request = {
            "model": self.model,
            "kvport": kvport,
            "steps": steps,
            "max_tokens": 8,
            # One chunk per step: prompts split at chunk boundaries with or without a hit, so outputs match bit
            # for bit (see kvport.demo.measure).
            "max_num_batched_tokens": CHUNK,
            "tp": tp,
            "env": TP2_ENV if tp == 2 else {},
        }
        (work / "request.json").write_text(json.dumps(request))
        log = open(work / "engine.log", "w")  # noqa: SIM115 - closed with the process by the caller's wait
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "vllm_steps.py"), str(work / "request.json"), str(work / "result.json")],
            env=engine_env(work),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return proc, work

    def finish(self, started: tuple[subprocess.Popen, Path], timeout: float = 600) -> dict:
        proc, work = started
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        if code != 0:
            tail = "\n".join((work / "engine.log").read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(f"engine {work.name} exited with {code}:\n{tail}")
        return json.loads((work / "result.json").read_text())

    def run(self, name: str, steps: list, kvport: dict | None, tp: int = 1) -> dict:
        return self.finish(self.start(name, steps, kvport, tp))

    def server(self, name: str) -> ServerProcess:
        return ServerProcess(self.root / name, {"address": f"ipc://{self.root}/{name}.sock"}, {"l1_bytes": "256MiB"})

    @functools.cached_property
    def baseline(self) -> dict:
        return self.run("baseline", [{"prompt": p} for p in self.prompts], None)

    @functools.cached_property
    def shared(self) -> int:
        a, b = (r["prompt_ids"] for r in self.baseline["results"][:2])
        n = 0
        while a[n] == b[n]:
            n += 1
        return n // CHUNK * CHUNK


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Engines:
    return Engines(tmp_path_factory.mktemp("server-vllm"))


def _outputs(result: dict) -> list:
    return [r["output_ids"] for r in result["results"]]


def test_two_engines_share_one_server_in_multiprocess_mode(engines: Engines) -> None:
    base = _outputs(engines.baseline)
    shared = engines.shared
    assert shared >= 2 * CHUNK and len({tuple(o) for o in base}) > 1
    marks = engines.root / "marks-ab"
    marks.mkdir()
    with engines.server("ab") as server:
        kvport = {"server": server.address}
        first = engines.start(
            "engine-a",
            [{"prompt": engines.prompts[0]}, {"prompt": engines.prompts[1]}, {"touch": str(marks / "a")}]
            + [{"wait": str(marks / "b")}],
            kvport,
        )
        second = engines.start("engine-b", [{"wait": str(marks / "a")}, {"prompt": engines.prompts[2]}], kvport)
        b = engines.finish(second)
        (marks / "b").touch()
        a = engines.finish(first)
        stats = server.stats()
    # Engine A: its second prompt hits the prefix its first stored, through the server (no disk tier anywhere).
    assert _outputs(a) == base[:2]
    assert [r["cached_tokens"] for r in a["results"]] == [0, shared]
    # Engine B, another engine process: its first request loads the prefix engine A computed.
    assert _outputs(b) == base[2:3]
    assert [r["cached_tokens"] for r in b["results"]] == [shared]
    worker_b = b["kvport_stats"]["worker0"]
    assert worker_b["cache"]["tokens_loaded"] == shared and worker_b["connector"]["load_failures"] == 0
    assert worker_b["cache"]["server"]["transport"] == "shm" and not worker_b["cache"]["server"]["staged"]
    assert b["kvport_stats"]["scheduler"]["hit_tokens"] == shared
    assert stats["counters"]["tokens_loaded"] == 2 * shared
    assert stats["namespaces"] == 1


def test_engine_serves_while_server_is_down_at_start_and_after_it_died(engines: Engines) -> None:
    base = _outputs(engines.baseline)
    marks = engines.root / "marks-c"
    marks.mkdir()
    server = engines.server("c")
    steps = [
        {"prompt": engines.prompts[0]},  # no server yet: recomputed
        {"touch": str(marks / "p0")},
        {"wait": str(marks / "up")},
        {"prompt": engines.prompts[1]},  # server up, empty: computed and stored
        {"prompt": engines.prompts[2]},  # hit
        {"touch": str(marks / "p2")},
        {"wait": str(marks / "killed")},
        {"prompt": engines.prompts[3]},  # server killed: recomputed
    ]
    started = engines.start("engine-c", steps, {"server": server.address, "server_timeout_ms": 500})
    try:
        _wait_file(marks / "p0", started[0])
        server.start()
        time.sleep(2.0)  # the engine's connections retry every 0.5 s
        (marks / "up").touch()
        _wait_file(marks / "p2", started[0])
        server.kill()
        (marks / "killed").touch()
        c = engines.finish(started)
    finally:
        server.kill()
    assert _outputs(c) == base
    assert [r["cached_tokens"] for r in c["results"]] == [0, 0, engines.shared, 0]
    conn = c["kvport_stats"]["worker0"]["cache"]["server"]
    assert conn["connects"] == 1 and conn["disconnects"] == 1 and conn["unavailable"] >= 1
    assert c["kvport_stats"]["worker0"]["cache"]["failures_server_unavailable"] >= 1


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"engine exited with {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.1)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 on CPU binds one core per rank")
def test_tensor_parallel_2_ranks_share_through_the_server(engines: Engines) -> None:
    steps = [{"prompt": p} for p in engines.prompts[:2]]
    base = engines.run("tp2-baseline", steps, None, tp=2)
    with engines.server("tp2") as server:
        started = time.perf_counter()
        result = engines.run("tp2-server", steps, {"server": server.address}, tp=2)
        wall = time.perf_counter() - started
        stats = server.stats()
    assert _outputs(result) == _outputs(base)
    assert [r["cached_tokens"] for r in result["results"]] == [0, engines.shared]
    for rank in (0, 1):  # each rank's worker process stored and loaded its own shard through the server
        worker = result["kvport_stats"][f"worker{rank}"]
        assert worker["rank"] == rank and worker["cache"]["tokens_loaded"] == engines.shared
    assert stats["namespaces"] == 2  # one per rank's shard
    walls = [round(r["wall_s"], 2) for r in result["results"]]
    base_walls = [round(r["wall_s"], 2) for r in base["results"]]
    print(
        f"tp2 with kvport server: {wall:.1f} s in all, engine start {result['engine_start_s']:.1f} s, prompts {walls} s"
        f" (without kvport: start {base['engine_start_s']:.1f} s, prompts {base_walls} s)"
    )
