"""The server's shared L1 on a real GPU: registered with the CUDA/ROCm runtime in each client (page-locked, so the
copy engines and mapped-host kernels address it), device KV stored by one process and loaded by another through it,
byte for byte. Skips where torch sees no CUDA/ROCm device (the lead runs it on the lent GPU)."""

from __future__ import annotations

import time

import pytest
import torch

from kvport.layouts import allocate, load_layout
from kvport.server.spawn import ServerProcess
from kvport.testing.gpu import reference_gather

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
        size = src.descriptor.canonical_bytes(3 * chunk)
        a = reference_gather(src.descriptor, tables, 3 * chunk)
        b = reference_gather(dst.descriptor, other, 3 * chunk)
        bad = (a != b).nonzero().flatten()
        if bad.numel():  # which chunks, whether never written (zeros), and whether the shared slots hold them
            per = size // 3
            arena = writer._arena.tensor.numpy().tobytes()
            in_slots = [arena.find(a[i * per : (i + 1) * per].cpu().numpy().tobytes()) >= 0 for i in range(3)]
            chunks = sorted(set((bad // per).tolist()))
            where = f"first at {int(bad[0])}, chunks {chunks}, {int((b[bad] == 0).sum())} of them zero"
            time.sleep(0.5)  # a second load later: right then means the first raced a transfer still in flight
            reader.load(tokens, other, len(tokens))
            b = reference_gather(dst.descriptor, other, 3 * chunk)
            where += f"; a second load 0.5 s later: {int((a != b).sum())} bytes differ"
            writer.close()
            reader.close()
            pytest.fail(f"{name}: {bad.numel()} of {size} bytes differ, {where}; whole in shared L1: {in_slots}")
        writer.close()
        reader.close()


def test_a_closed_client_leaves_no_page_locked_mapping_behind(tmp_path) -> None:
    """close() unregisters the shared L1 it page-locked. Left registered, the mapping's addresses stay registered
    after it is unmapped, and the next mapping placed there looks page-locked while DMA writes the old pages: on the
    H200 a later client's stores then left its slots zero (the MLA case above, in the full GPU suite)."""
    from kvport.cache import load_config
    from kvport.server.remote import RemoteCache

    spec = load_layout("vllm-flash-nhd")
    kv = allocate(spec, 8, device="cuda", fill="zeros")
    address = f"ipc://{tmp_path}/gpu.sock"
    with ServerProcess(tmp_path, {"address": address}, {"l1_bytes": "64MiB"}):
        cfg = load_config(overrides={"chunk_tokens": 16, "server": address}, environ={})
        client = RemoteCache(cfg, "gpu-close")
        client.bind(kv.descriptor)
        arena = client._arena
        assert arena.tensor.is_pinned() and not client.stats()["server"]["staged"]
        client.close()
        assert not arena.tensor.is_pinned()  # still mapped (held here), no longer registered
