"""Platform detection against faked torch modules and environments: no real device is touched."""

from types import SimpleNamespace

import pytest

from kvport.hal.platform import detect_platform


def fake_torch(cuda=None, hip=None, devices=0, name="Fake GPU", xpu=None):
    return SimpleNamespace(
        __version__="9.9.9",
        version=SimpleNamespace(cuda=cuda, hip=hip),
        cuda=SimpleNamespace(device_count=lambda: devices, get_device_name=lambda i: name),
        xpu=xpu,
    )


def no_spec(name):
    return None


def test_cuda_device_detected():
    info = detect_platform(fake_torch(cuda="13.0", devices=2, name="NVIDIA H100"), {}, no_spec)
    assert (info.name, info.device_name, info.device_count) == ("cuda", "NVIDIA H100", 2)


def test_rocm_build_is_rocm_not_cuda():
    info = detect_platform(fake_torch(hip="6.2", devices=1, name="AMD Instinct MI250X"), {}, no_spec)
    assert info.name == "rocm"
    assert info.reasons["cuda"] == "torch is a ROCm build"


def test_cuda_build_without_device_falls_to_cpu_with_reasons():
    info = detect_platform(fake_torch(cuda="13.0", devices=0), {}, no_spec)
    assert info.name == "cpu"
    assert "sees no CUDA device" in info.reasons["cuda"]
    assert info.reasons["rocm"] == "torch was built without ROCm (HIP)"
    assert info.reasons["xpu"] == "torch has no xpu module"
    assert "habana_frameworks" in info.reasons["hpu"]


def test_xpu_detected():
    xpu = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_name=lambda i: "Intel Max 1550")
    info = detect_platform(fake_torch(xpu=xpu), {}, no_spec)
    assert (info.name, info.device_name) == ("xpu", "Intel Max 1550")


def test_hpu_detected_from_installed_habana_frameworks():
    info = detect_platform(fake_torch(), {"HABANA_VISIBLE_DEVICES": "0,1"}, lambda n: object())
    assert (info.name, info.device_count) == ("hpu", 2)


def test_forced_platform_and_bad_value():
    assert detect_platform(fake_torch(cuda="13.0", devices=1), {"KVPORT_PLATFORM": "cpu"}, no_spec).name == "cpu"
    with pytest.raises(ValueError, match="KVPORT_PLATFORM='tpu': expected one of"):
        detect_platform(fake_torch(), {"KVPORT_PLATFORM": "tpu"}, no_spec)


def test_real_machine_detection_does_not_raise():
    info = detect_platform()
    assert info.name in ("cuda", "rocm", "xpu", "hpu", "cpu")
    assert info.torch_version
