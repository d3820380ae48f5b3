"""Compiler command lines for the native module: the same kernels/cuda/*.cu sources for nvcc and hipcc.
Owns flags and the link step; must not decide the target (target.py does) or know any kernel by name."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

from kvport._build.target import BuildTarget

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"


def cuda_sources() -> list[Path]:
    return sorted((KERNEL_DIR / "cuda").glob("*.cu"))


def arch_flags(target: BuildTarget) -> list[str]:
    if target.name == "cuda":
        flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in target.archs]
        newest = max(target.archs, key=int)
        return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
    return [f"--offload-arch={a}" for a in target.archs]


def compile_commands(target: BuildTarget, out_dir: Path, pybind_include: str) -> tuple[list[list[str]], list[Path]]:
    """One command per object file, then the objects. Kernels go through the vendor compiler; the pybind11
    binding is plain C++ (it includes no vendor header), compiled by the host compiler."""
    common = ["-O3", "-std=c++17", f"-I{KERNEL_DIR / 'cuda'}"]
    commands, objects = [], []
    for src in cuda_sources():
        obj = out_dir / (src.stem + ".o")
        if target.name == "cuda":
            cmd = [target.compiler, *common, "-Xcompiler", "-fPIC", *arch_flags(target), "-c", str(src)]
        else:
            cmd = [target.compiler, *common, "-fPIC", "-DKVPORT_HIP", "-x", "hip", *arch_flags(target), "-c", str(src)]
        commands.append([*cmd, "-o", str(obj)])
        objects.append(obj)
    binding = out_dir / "bindings.o"
    cxx = os.environ.get("CXX", "c++")
    py_include = sysconfig.get_paths()["include"]
    define = f"-DKVPORT_TARGET_NAME=\"{target.name}\""
    archs = f"-DKVPORT_TARGET_ARCHS=\"{';'.join(target.archs)}\""
    commands.append(
        [cxx, *common, "-fPIC", "-fvisibility=hidden", f"-I{pybind_include}", f"-I{py_include}", define, archs,
         f"-DKVPORT_MODULE_NAME=_native_{target.name}", "-c", str(KERNEL_DIR / "cuda" / "bindings.cpp"),
         "-o", str(binding)]
    )
    objects.append(binding)
    return commands, objects


def link_command(target: BuildTarget, objects: list[Path], output: Path) -> list[str]:
    if target.name == "cuda":
        # nvcc links the CUDA runtime statically by default: the module needs only the driver, not libcudart.
        return [target.compiler, "-shared", *arch_flags(target), *map(str, objects), "-o", str(output)]
    return [target.compiler, "-shared", "-fPIC", *arch_flags(target), *map(str, objects), "-o", str(output)]


def build_native(target: BuildTarget, out_dir: Path, output: Path, pybind_include: str, log=print) -> None:
    """Compile and link; raise RuntimeError with the compiler's own message on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if target.name == "hip":
        # hipcc picks NVIDIA mode when nvcc is also installed; kvport's hip target always means AMD.
        env.setdefault("HIP_PLATFORM", "amd")
    commands, objects = compile_commands(target, out_dir, pybind_include)
    for cmd in [*commands, link_command(target, objects, output)]:
        log(" ".join(cmd))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr or done.stdout}")
