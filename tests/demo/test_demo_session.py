"""The engine-process runner of the demo, without vLLM: a stand-in interpreter plays the engine process, so the
request/result hand-over, the cleanup of the workdir and the timeout message are checked on any machine."""

from __future__ import annotations

import stat
import sys

import pytest

from kvport.demo import session


def _fake_python(tmp_path, body: str):
    """An executable that receives ``-m kvport.demo.driver REQUEST RESULT`` like the real interpreter."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_success_returns_the_result_and_leaves_only_the_log(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path, 'echo \'{"results": [1]}\' > "$4"')))
    work = tmp_path / "work"
    assert session.run_engine({"prompts": []}, work, timeout=30, log_name="x") == {"results": [1]}
    # Each request carries every prompt's token ids; a persistent workdir (the demo's) must not collect them.
    assert sorted(p.name for p in work.iterdir()) == ["engine-x.log"]


def test_timeout_is_a_session_error_naming_the_log(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path, "echo started; exec sleep 30")))
    with pytest.raises(session.SessionError, match=r"did not finish in 0.5 s .*engine-slow\.log"):
        session.run_engine({"prompts": []}, tmp_path / "work", timeout=0.5, log_name="slow")


def test_failure_keeps_the_request_for_a_rerun(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", str(_fake_python(tmp_path, "echo boom; exit 3")))
    work = tmp_path / "work"
    with pytest.raises(session.SessionError, match=r"exited with 3[\s\S]*boom"):
        session.run_engine({"prompts": []}, work, timeout=30, log_name="bad")
    assert [p.name for p in work.glob("request-*.json")]


def test_a_second_run_on_the_same_workdir_stops_in_one_line(tmp_path) -> None:
    """The demo wipes its disk cache at start: a concurrent run on the same directory must not, and says why."""
    import os
    import pathlib
    import subprocess
    import sys

    import pytest

    from kvport.demo.measure import workdir_lock
    from kvport.errors import UserError

    with workdir_lock(tmp_path):
        with pytest.raises(UserError, match=r"in use by another kvport demo or bench run \(pid \d+\)"):
            with workdir_lock(tmp_path):
                pass
        code = "import sys, pathlib, kvport.demo.measure as m; m.workdir_lock(pathlib.Path(sys.argv[1])).__enter__()"
        root = str(pathlib.Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root)
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
        assert other.returncode != 0 and "in use by another kvport demo" in other.stderr
    with workdir_lock(tmp_path):  # released with the run
        pass
