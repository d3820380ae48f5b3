"""Build-target resolution: KVPORT_TARGET / BUILD_WITH_HIP rules, compiler discovery and the one-line errors."""

import pytest

from kvport._build.target import DEFAULT_CUDA_ARCHS, BuildTargetError, resolve_target


def which_of(*present):
    table = {"nvcc": "/opt/cuda/bin/nvcc", "hipcc": "/usr/bin/hipcc"}
    return lambda tool: table.get(tool) if tool in present else None


def test_auto_prefers_nvcc_then_hipcc_then_none():
    assert resolve_target({}, which_of("nvcc", "hipcc")).name == "cuda"
    assert resolve_target({}, which_of("hipcc")).name == "hip"
    none = resolve_target({}, which_of())
    assert none.name == "none" and none.compiler is None
    assert "neither nvcc nor hipcc" in none.reason


def test_explicit_cuda_uses_default_archs_including_80_and_90():
    target = resolve_target({"KVPORT_TARGET": "cuda"}, which_of("nvcc"))
    assert target.compiler == "/opt/cuda/bin/nvcc"
    assert target.archs == tuple(DEFAULT_CUDA_ARCHS.split(";"))
    assert {"80", "90"} <= set(target.archs)


def test_build_with_hip_means_hip():
    target = resolve_target({"BUILD_WITH_HIP": "1", "KVPORT_HIP_ARCHS": "gfx90a;gfx942"}, which_of("nvcc", "hipcc"))
    assert (target.name, target.archs) == ("hip", ("gfx90a", "gfx942"))


def test_none_needs_no_compiler():
    assert resolve_target({"KVPORT_TARGET": "none"}, which_of()).name == "none"


@pytest.mark.parametrize(
    ("environ", "present", "message"),
    [
        ({"KVPORT_TARGET": "cuda"}, (), "KVPORT_TARGET=cuda needs nvcc on PATH (or KVPORT_NVCC"),
        ({"KVPORT_TARGET": "hip"}, ("nvcc",), "KVPORT_TARGET=hip needs hipcc on PATH (or KVPORT_HIPCC"),
        ({"KVPORT_TARGET": "metal"}, (), "KVPORT_TARGET='metal' is not a target"),
        ({"BUILD_WITH_HIP": "1", "KVPORT_TARGET": "cuda"}, ("nvcc", "hipcc"), "BUILD_WITH_HIP=1 conflicts"),
        ({"KVPORT_TARGET": "cuda", "KVPORT_CUDA_ARCHS": "sm_90"}, ("nvcc",), "'sm_90' is not an architecture"),
        ({"KVPORT_TARGET": "hip", "KVPORT_HIP_ARCHS": ";"}, ("hipcc",), "names no architecture"),
    ],
)
def test_errors_are_one_line(environ, present, message):
    with pytest.raises(BuildTargetError) as info:
        resolve_target(environ, which_of(*present))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_explicit_compiler_variable_is_honoured():
    target = resolve_target({"KVPORT_TARGET": "cuda", "KVPORT_NVCC": "nvcc-13"}, lambda t: f"/x/{t}")
    assert target.compiler == "/x/nvcc-13"
