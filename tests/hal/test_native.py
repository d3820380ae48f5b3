"""Native-module status from build records: what was built, whether it loads, and why not."""

import json

from kvport.hal.native import native_status, read_build_info


def write(tmp_path, info) -> object:
    path = tmp_path / "_build_info.json"
    path.write_text(json.dumps(info) if isinstance(info, dict) else info)
    return path


def test_pure_python_build_says_why(tmp_path):
    reason = "auto: neither nvcc nor hipcc on PATH, so no native kernels were built"
    status = native_status(build_info_path=write(tmp_path, {"target": "none", "archs": [], "reason": reason}))
    assert (status.target, status.loadable, status.reason) == ("none", False, reason)


def test_built_but_missing_module_is_reported(tmp_path):
    path = write(tmp_path, {"target": "hip", "archs": ["gfx90a"], "reason": "KVPORT_TARGET=hip"})
    status = native_status(build_info_path=path)
    assert status.target == "hip" and not status.loadable
    assert status.reason.startswith("built for hip but kvport._native_hip does not load:")
    assert status.archs == ("gfx90a",)


def test_corrupt_build_record(tmp_path):
    info = read_build_info(write(tmp_path, "{not json"))
    assert info["target"] == "unknown" and "unreadable" in info["reason"]


def test_no_record_in_a_source_tree(tmp_path):
    status = native_status(build_info_path=tmp_path / "missing.json")
    assert status.target in ("unknown", "cuda", "hip")
    assert status.reason
