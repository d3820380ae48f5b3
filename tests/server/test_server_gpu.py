"""The server's shared L1 on a real GPU: registered with the CUDA/ROCm runtime in each client (page-locked, so the
copy engines and mapped-host kernels address it), device KV stored by one process and loaded by another through it,
byte for byte. Skips where torch sees no CUDA/ROCm device (the lead runs it on the lent GPU)."""

from __future__ import annotations

import pytest
import torch

from kvport.hal.backends.torch_ref import TorchBackend
from kvport.layouts import allocate, load_layout
from kvport.server.spawn import ServerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]
pytest.importorskip("zmq", reason="pyzmq is not installed")


def test_shared_memory_is_registered_page_locked() -> None:
    import tempfile

    from kvport.hal.platforms import platform_for_device
    from kvport.server.shm import SharedArena

    # In /dev/shm, as the server creates it: on the H200 machine the runtime refused to register the same mapping of
    # a file on the disk-backed /tmp (cudaErrorInvalidValue).
    arena = SharedArena.create(tempfile.mkdtemp(dir="/dev/shm"), "gpu.l1", 64 << 20, 0o600)
    try:
        view = SharedArena.attach(arena.path, arena.nbytes)
        platform = platform_for_device(torch.device("cuda"))
        assert not view.tensor.is_pinned()
        assert platform.register_host(view.tensor) is True
        assert view.tensor.is_pinned() and view.tensor[4096:8192].is_pinned()
        device = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
        view.tensor[: 1 << 20].copy_(device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(arena.tensor[: 1 << 20].cuda(), device)  # written through one mapping, read via the other
        platform.unregister_host(view.tensor)
    finally:
        arena.close()


@pytest.mark.parametrize("name", ["vllm-flash-nhd", "vllm-mla"])
def test_device_kv_through_the_server_byte_exact(tmp_path, name) -> None:
    from kvport.cache import load_config
    from kvport.server.remote import RemoteCache

    spec = load_layout(name)
    chunk = 256
    blocks = [4 * chunk // g.tokens_per_block + 4 for g in spec.groups]
    src = allocate(spec, blocks, device="cuda", generator=torch.Generator().manual_seed(0))
    dst = allocate(spec, blocks, device="cuda", fill="zeros")
    tables = [list(range(3 * chunk // g.tokens_per_block)) for g in spec.groups]
    other = [[b + 2 for b in t] for t in tables]
    tokens = list(range(3 * chunk))
    address = f"ipc://{tmp_path}/gpu.sock"
    with ServerProcess(tmp_path, {"address": address}, {"l1_bytes": "256MiB"}):
        cfg = load_config(overrides={"chunk_tokens": chunk, "server": address}, environ={})
        writer = RemoteCache(cfg, f"gpu-{name}")
        writer.bind(src.descriptor)
        assert writer._arena.tensor.is_pinned() and not writer.stats()["server"]["staged"]
        assert writer.mover.path_for("d2h", chunk, 3) != "sync"
        assert writer.store(tokens, tables) == 3 * chunk
        reader = RemoteCache(cfg, f"gpu-{name}")
        reader.bind(dst.descriptor)
        assert reader.load(tokens, other, len(tokens)) == 3 * chunk
        torch.cuda.synchronize()
        writer.close()
        reader.close()
    ref = TorchBackend()
    size = src.descriptor.canonical_bytes(3 * chunk)
    a = torch.empty(size, dtype=torch.uint8, device="cuda")
    b = torch.empty(size, dtype=torch.uint8, device="cuda")
    ref.gather(src.descriptor, tables, a, 3 * chunk)
    ref.gather(dst.descriptor, other, b, 3 * chunk)
    assert torch.equal(a, b)
