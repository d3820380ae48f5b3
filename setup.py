"""Builds kvport's native module for the target KVPORT_TARGET names (cuda, hip, none, auto; BUILD_WITH_HIP=1 = hip).
Metadata lives in pyproject.toml; this file only adds the native build and records what was built and why."""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kvport._build.target import BuildTargetError, resolve_target  # noqa: E402

# Resolved before anything else is imported, so a bad target is one line even where setuptools is missing.
try:
    TARGET = resolve_target(os.environ)
except BuildTargetError as exc:
    sys.exit(f"kvport build: {exc}")

from setuptools import Extension, setup  # noqa: E402
from setuptools.command.build_ext import build_ext  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

from kvport._build.compile import build_native  # noqa: E402


class BuildNative(build_ext):
    """Compiles kernels/cuda/*.cu with nvcc or hipcc directly: no libtorch, no torch at build time."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        output = Path(self.get_ext_fullpath(ext.name))
        try:
            build_native(TARGET, Path(self.build_temp) / "native", output, pybind11.get_include(), log=self.announce)
        except RuntimeError as exc:
            sys.exit(f"kvport build: native {TARGET.name} build failed: {exc}")


class BuildPyWithInfo(build_py):
    """Writes kvport/_build_info.json so `kvport doctor` can say what was built and why."""

    def run(self) -> None:
        super().run()
        info = {
            "target": TARGET.name,
            "archs": list(TARGET.archs),
            "compiler": TARGET.compiler,
            "reason": TARGET.reason,
        }
        path = Path(self.build_lib) / "kvport" / "_build_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")


ext_modules = [] if TARGET.name == "none" else [Extension(f"kvport._native_{TARGET.name}", sources=[])]
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildNative, "build_py": BuildPyWithInfo})
