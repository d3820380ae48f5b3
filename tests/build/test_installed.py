"""Checks an installed kvport against the target the nox `build(target)` session built it for.
Runs only inside that session (KVPORT_EXPECT_TARGET set); elsewhere there is no build to check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED = os.environ.get("KVPORT_EXPECT_TARGET")
pytestmark = pytest.mark.skipif(not EXPECTED, reason="only in the nox build(target) session")


def doctor_json(cwd) -> dict:
    # Run outside the source tree so the installed package, not ./kvport, answers.
    command = [sys.executable, "-m", "kvport.cli.main", "doctor", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_build_record_names_the_target():
    import kvport.hal.native as native

    info = native.read_build_info()
    assert info is not None, "the installed package has no _build_info.json"
    assert info["target"] == EXPECTED
    assert info["reason"]


@pytest.mark.skipif(EXPECTED not in ("cuda", "hip"), reason="native targets only")
def test_native_module_is_built_from_the_shared_sources():
    import kvport.hal.native as native

    module = native.load_native(EXPECTED)
    assert module.TARGET == EXPECTED
    binary = Path(module.__file__).read_bytes()
    if EXPECTED == "hip":
        # clang's offload bundle names each device code object by its triple and arch.
        assert b"amdgcn-amd-amdhsa--gfx90a" in binary
    else:
        # nvcc records each embedded cubin's arch; the nox session builds KVPORT_CUDA_ARCHS=80;90.
        assert b"sm_80" in binary and b"sm_90" in binary
    # No GPU here: the module loads, and the runtime says why it sees no device.
    info = module.runtime_info()
    assert info["device_count"] == 0 and info["error"]


@pytest.mark.skipif(EXPECTED not in ("cuda", "hip"), reason="native targets only")
def test_native_module_does_not_link_libtorch():
    import kvport.hal.native as native

    module = native.load_native(EXPECTED)
    done = subprocess.run(["ldd", module.__file__], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "libtorch" not in done.stdout and "libc10" not in done.stdout


def test_doctor_explains_the_native_state(tmp_path):
    report = doctor_json(tmp_path)
    native = report["native"]
    assert native["target"] == EXPECTED
    assert native["usable"] is False  # no GPU on the build machine
    if EXPECTED == "none":
        assert native["loadable"] is False
        assert "neither nvcc nor hipcc" in native["reason"]
    else:
        assert native["loadable"] is True
        assert f"kvport._native_{EXPECTED} loads; {EXPECTED} runtime:" in native["reason"]
    assert report["selected_backend"] == "torch"
