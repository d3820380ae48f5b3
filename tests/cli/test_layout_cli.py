"""`kvport layout list|show|check` through the real entry point: output, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

from kvport.cli.main import main
from kvport.layouts import catalog_names
from kvport.layouts.loader import SPECS_DIR


def test_list_shows_every_catalog_entry(capsys):
    assert main(["layout", "list"]) == 0
    out = capsys.readouterr().out
    for name in catalog_names():
        assert f"\n{name} " in out
    assert "vllm-flash-nhd" in out and "256" in out


def test_show_prints_groups_shapes_and_sizes(capsys):
    assert main(["layout", "show", "trtllm-pool", "--dims", "layers=32", "kv_heads=8", "head_dim=128"]) == 0
    out = capsys.readouterr().out
    assert "tensor     one buffer [blocks, 32, 2, 32768] bfloat16" in out
    assert "component  k: 8 row(s) x 256 bytes (bfloat16) per slot" in out
    assert "bytes/token  131072" in out
    assert "chunk        33554432 bytes for 256 tokens" in out


def test_show_deepseek_groups(capsys):
    assert main(["layout", "show", "deepseek-v4", "--chunk-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "groups[2]    indexer: kind indexer" in out
    assert "component  scale: 1 row(s) x 4 bytes (float32) per slot" in out
    assert "padding    rows use 584 of 640 bytes" in out


def test_show_bad_dims_exit_2(capsys):
    assert main(["layout", "show", "vllm-flash-nhd", "--dims", "layers"]) == 2
    assert capsys.readouterr().err == "kvport layout: --dims: 'layers' is not KEY=VALUE\n"
    assert main(["layout", "show", "vllm-flash-nhd", "--dims", "layers=0"]) == 2
    assert capsys.readouterr().err == "kvport layout: vllm-flash-nhd.yaml: groups[0].layers: must be > 0, got 0\n"
    assert main(["layout", "show", "nope"]) == 2
    assert capsys.readouterr().err.startswith("kvport layout: unknown layout 'nope'; catalog: ")


def test_check_valid_files_exit_0(capsys):
    files = [str(SPECS_DIR / f"{name}.yaml") for name in catalog_names()]
    assert main(["layout", "check", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("\nok  ") + out.startswith("ok  ") == len(files)


def test_check_reports_each_bad_file_on_one_line(tmp_path, capsys):
    good = SPECS_DIR / "vllm-flash-nhd.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("axes: KBNHC", "axes: KBNHQ"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ngroups: [\n")
    assert main(["layout", "check", str(good), str(bad), str(broken), str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 3
    assert lines[0] == f"{bad}: groups[0].axes: unknown axis letter 'Q' in 'KBNHQ'; letters are L B K H D N C"
    assert lines[1].startswith(f"{broken}: invalid YAML at line 3: ")
    assert lines[2] == f"{tmp_path / 'missing.yaml'}: no such file"
    assert captured.out.startswith(f"ok  {good}: vllm-flash-nhd")


def test_check_in_a_real_process_never_prints_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngroups:\n  - {kind: attention}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvport.cli.main", "layout", "check", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr == f"{bad}: groups[0]: missing field 'layers'\n"
    assert "Traceback" not in proc.stderr
