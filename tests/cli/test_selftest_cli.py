"""`kvport selftest` through the real entry point: one line per layout and backend, cross pairs, exit codes."""

from __future__ import annotations

import re
import sys
import types

import pytest

from kvport.cli.main import main
from kvport.layouts import catalog_names
from kvport.layouts.loader import SPECS_DIR


def test_whole_catalog_passes_with_torch(capsys):
    assert main(["selftest", "--backend", "torch", "--seed", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in catalog_names():
        assert any(line.startswith(f"ok   {name} ") and "[torch/cpu]" in line for line in out), name
    assert "ok   cross vllm-flash-nhd -> 26 compatible [torch/cpu]" in out
    assert "ok   cross vllm-mla -> 6 compatible [torch/cpu]" in out
    assert out[-1].startswith("selftest: ") and " 0 failed" in out[-1]


def test_one_layout_by_file_and_default_backend(capsys):
    path = SPECS_DIR / "sglang-mha.yaml"
    assert main(["selftest", "--layout", str(path), "--seed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    # The registry picks the backend (torch, or Triton where it can run): the report names whichever it chose.
    assert re.fullmatch(r"ok   sglang-mha +\[\w+/cpu\] \d+ tokens, \d+ bytes", out[0])
    assert re.fullmatch(r"ok   cross sglang-mha -> 26 compatible \[\w+/cpu\]", out[1])
    assert out[2] == "selftest: 2 passed, 0 failed, 0 skipped (seed 1)"


class _FlipsOneByte:
    """A real Backend that corrupts one gathered byte: selftest must report it and exit 1."""

    @staticmethod
    def make():
        from kvport.hal.backends.torch_ref import TorchBackend

        class FlipsOneByte(TorchBackend):
            name = "flip"

            def gather(self, descriptor, block_ids, dst, num_tokens):
                done = super().gather(descriptor, block_ids, dst, num_tokens)
                dst[0] ^= 1
                return done

        return FlipsOneByte


def test_a_corrupting_backend_fails_with_exit_1(monkeypatch, capsys):
    from kvport.hal import registry

    module = types.ModuleType("kvport_selftest_faulty")
    module.FlipsOneByte = _FlipsOneByte.make()
    monkeypatch.setitem(sys.modules, "kvport_selftest_faulty", module)
    monkeypatch.setitem(registry.BACKENDS, "flip", "kvport_selftest_faulty:FlipsOneByte")
    assert main(["selftest", "--backend", "flip", "--layout", "vllm-flash-nhd", "--no-cross"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL vllm-flash-nhd ")
    assert "[flip/cpu]" in out[0] and "gather: 1 of" in out[0] and "(first at 0)" in out[0]
    assert out[-1] == "selftest: 0 passed, 1 failed, 0 skipped (seed 0)"


def test_a_yaml_only_model_passes(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "groups:\n"
        "  - {kind: mla, layers: 1, tokens_per_block: 2, structure: per_layer, axes: BNC, dtype: uint8,\n"
        "     content: {bytes: 3}}\n"
    )
    assert main(["selftest", "--layout", str(path), "--no-cross"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "selftest: 1 passed, 0 failed, 0 skipped (seed 0)"


@pytest.mark.parametrize(
    ("argv", "err"),
    [
        (["selftest", "--backend", "nope"], "kvport selftest: --backend: unknown backend 'nope'; known: "),
        (["selftest", "--layout", "nope"], "kvport selftest: unknown layout 'nope'; catalog: "),
        (["selftest", "--device", "bogus"], "kvport selftest: --device: 'bogus' is not a torch device"),
        (["selftest", "--device", "hpu"], "kvport selftest: --device: torch has no hpu support here"),
    ],
)
def test_user_errors_exit_2(argv, err, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(err)


@pytest.mark.parametrize("kind", ["xpu", "mps", "cuda"])
def test_a_device_torch_was_not_built_for_exits_2(kind, monkeypatch, capsys):
    # The CPU wheel ships torch.xpu and torch.mps; a device it cannot reach is a user error, not a traceback.
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(getattr(torch, kind), "is_available", lambda: False)
    assert main(["selftest", "--device", kind, "--layout", "vllm-flash-nhd", "--no-cross"]) == 2
    what = "CUDA/ROCm" if kind == "cuda" else kind
    assert capsys.readouterr().err == f"kvport selftest: --device: {kind} requested but torch sees no {what} device\n"


@pytest.mark.gpu
def test_cuda_device_with_torch_backend(capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    assert main(["selftest", "--backend", "torch", "--device", "cuda", "--layout", "vllm-flash-hnd"]) == 0
    assert "[torch/cuda]" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_device_with_pinned_host_staging(capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA/ROCm device")
    argv = ["selftest", "--device", "cuda", "--staging", "host", "--layout", "trtllm-pool", "--layout", "deepseek-v4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cuda, host staging]" in out and " 0 failed" in out
