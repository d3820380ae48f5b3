"""One-call staged chunks on a GPU: more chunks in flight than block-id slots, results dropped unwaited, every
chunk still moves its own blocks (the slots and the device id buffer are reused only when safe)."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kvport.hal.transfer.block_id_ring import SLOTS  # noqa: E402
from kvport.hal.transfer.executor import Transfer  # noqa: E402
from kvport.kernels.torch.gather import gather as ref_gather  # noqa: E402
from kvport.layouts import allocate, load_layout  # noqa: E402
from kvport.testing.gpu import backend_or_skip  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device"),
]

CHUNKS = 2 * SLOTS + 3


@pytest.mark.parametrize("direction", ["d2h", "h2d"])
@pytest.mark.parametrize("layout", ["deepseek-v4", "vllm-mla", "vllm-flash-hnd"])
def test_chunks_in_flight_beyond_the_slots_keep_their_own_blocks(layout, direction):
    native = backend_or_skip("cuda")
    spec = load_layout(layout)
    tokens = 2 * max(g.tokens_per_block for g in spec.groups) + 3
    need = [-(-tokens // g.tokens_per_block) for g in spec.groups]
    # Disjoint blocks per chunk, so a chunk that used another's ids (a slot rewritten too early) cannot pass.
    blocks = [CHUNKS * n + 1 for n in need]
    kv = allocate(
        spec, blocks if len(blocks) > 1 else blocks[0], device="cuda", generator=torch.Generator().manual_seed(5)
    )
    d = kv.descriptor
    rng = random.Random(5)
    order = [rng.sample(range(b), b) for b in blocks]
    tables = [[order[g][c * n : (c + 1) * n] for g, n in enumerate(need)] for c in range(CHUNKS)]
    nbytes = d.canonical_bytes(tokens)
    transfer = Transfer(native, "cuda", native=native)
    hosts = [
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(c)).pin_memory()
        for c in range(CHUNKS)
    ]

    def issue(host, table):
        if direction == "d2h":
            return transfer.to_host(d, table, host, tokens, path="staged")
        return transfer.from_host(host, d, table, tokens, path="staged")

    issue(torch.empty(nbytes, dtype=torch.uint8).pin_memory(), tables[0]).synchronize()  # tables compiled, staging
    with torch.cuda.stream(transfer.kernel_stream):
        torch.cuda._sleep(50_000_000)  # ~25 ms: every chunk below is queued before the first one runs
    for host, table in zip(hosts, tables):
        issue(host, table)  # dropped unwaited
    torch.cuda.synchronize()
    guarded = sum(e is not None for e in transfer._one_call.ring._uploaded)
    assert guarded == SLOTS, "chunks did not take the one-call path"
    for c, (host, table) in enumerate(zip(hosts, tables)):
        expect = torch.empty(nbytes, dtype=torch.uint8)
        ref_gather(d, table, expect, tokens)
        got = host if direction == "d2h" else expect
        want = expect if direction == "d2h" else host
        assert torch.equal(got, want), f"{layout} {direction}: chunk {c} moved other blocks' bytes"
