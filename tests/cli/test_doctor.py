"""`kvport doctor`: text and JSON reports on this machine, and the CLI's exit codes."""

import json

from kvport.cli.main import main


def test_doctor_json_has_every_section(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"]["name"] in ("cpu", "cuda", "rocm", "xpu", "hpu")
    assert set(report["platform"]["reasons"]) | {report["platform"]["name"]} == {"cpu", "cuda", "rocm", "xpu", "hpu"}
    assert report["versions"]["torch"]
    assert {"target", "archs", "loadable", "reason"} <= set(report["native"])
    names = [b["name"] for b in report["backends"]]
    assert "torch" in names
    priorities = [b["priority"] for b in report["backends"]]
    assert priorities == sorted(priorities, reverse=True)
    assert all(b["reason"] for b in report["backends"])
    assert report["selected_backend"] in names


def test_doctor_text_names_platform_native_and_backends(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "platform" in out and "native" in out and "backends (priority order):" in out
    assert "torch" in out


def test_forced_unknown_backend_makes_doctor_fail(capsys, monkeypatch):
    monkeypatch.setenv("KVPORT_BACKEND", "nope")
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["selected_backend"] is None
    assert "KVPORT_BACKEND='nope' is not a backend" in report["selection_error"]


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "doctor" in capsys.readouterr().out


def test_bench_without_name_is_a_user_error(capsys):
    assert main(["bench"]) == 2
    assert "name a benchmark" in capsys.readouterr().err


def test_import_and_parser_build_have_no_heavy_side_effects():
    """Importing kvport and building the whole CLI parser must not import torch (no device queries at import)."""
    import subprocess
    import sys

    code = "import sys, kvport, kvport.cli.main as m; m.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_doctor_reports_engines_and_the_effective_cache_config(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("KVPORT_CONFIG", raising=False)
    path = tmp_path / "kv.yaml"
    path.write_text(f"chunk_tokens: 512\nl1_bytes: 64MiB\nl2_path: {tmp_path / 'l2'}\n")
    assert main(["doctor", "--json", "--config", str(path), "--no-engine-imports"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["engine"] for e in report["engines"]] == ["vllm", "sglang", "tensorrt_llm"]
    for e in report["engines"]:
        assert e["installed"] == (e["version"] is not None) and e["adapter"]
    cache = report["cache_config"]
    assert cache["source"] == str(path) and "error" not in cache
    assert cache["settings"]["chunk_tokens"] == 512 and cache["settings"]["l2_path"] == str(tmp_path / "l2")
    assert main(["doctor", "--config", str(path), "--no-engine-imports"]) == 0
    text = capsys.readouterr().out
    assert "engines:" in text and f"cache config ({path}):" in text and "chunk_tokens         512" in text


def test_doctor_shows_a_bad_cache_config_and_fails(capsys, tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text("l2_pth: /tmp/x\n")
    assert main(["doctor", "--json", "--config", str(path), "--no-engine-imports"]) == 1
    error = json.loads(capsys.readouterr().out)["cache_config"]["error"]
    assert "unknown key 'l2_pth'" in error


def test_doctor_says_how_the_copy_engines_are_driven():
    """A loadable native module reports batched copy calls or one call per region (then small regions are staged);
    with no module there is nothing to say."""
    from kvport.cli import doctor

    report = doctor.collect(engine_imports=False)
    report["native"]["batched_copies"] = True
    assert "copy engines: batched calls" in doctor.render(report)
    report["native"]["batched_copies"] = False
    assert "copy engines: one call per region" in doctor.render(report)
    report["native"]["batched_copies"] = None
    assert "copy engines" not in doctor.render(report)
