"""kvport's catalog layouts for SGLang 0.5.23's device pools, against the real pools on the CPU: MHATokenToKVPool in
its default NHD layout (sglang-mha) and with SGLANG_USE_HND_KVCACHE=1 (sglang-mha-hnd), MLATokenToKVPool
(sglang-mla). Tokens are written by the pool's own set_kv_buffer / set_mla_kv_buffer, gathered by kvport and compared
with the tokens written, then scattered into a fresh pool and compared byte for byte with the pool writing them."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.sglang

from sglang_env import import_sglang  # noqa: E402

import_sglang()

import torch  # noqa: E402
from sglang_env import Pools, device_pool, expected_chunk, random_tokens, write_tokens  # noqa: E402

from kvport.hal.backends.torch_ref import TorchBackend  # noqa: E402
from kvport.layouts import compile_descriptor, load_layout  # noqa: E402

PAGE, LAYERS = 16, 3
PAGES = [5, 2, 6]  # device page 0 is SGLang's padding page
CASES = [  # (catalog layout, MLA, SGLANG_USE_HND_KVCACHE, buffer shape SGLang allocates per layer and component)
    ("sglang-mha", False, False, (9 * PAGE, 2, 64)),
    ("sglang-mha-hnd", False, True, (9, 2, PAGE, 64)),
    ("sglang-mla", True, False, (9 * PAGE, 1, 576)),
]


def _pool(mla: bool, hnd: bool, monkeypatch) -> Pools:
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1" if hnd else "0")
    device = device_pool(mla, layers=LAYERS, page_size=PAGE, device_tokens=8 * PAGE)
    return Pools(device, None, mla)


def _bind(name: str, pools: Pools):
    dev = pools.device
    if pools.mla:
        dims = dict(kv_lora_rank=dev.kv_lora_rank, rope_dim=dev.qk_rope_head_dim)
        tensors = dev.kv_buffer
    else:
        dims = dict(kv_heads=dev.head_num, head_dim=dev.head_dim)
        tensors = (dev.k_buffer, dev.v_buffer)
    spec = load_layout(name, layers=LAYERS, page_size=PAGE, dtype="bfloat16", **dims)
    return compile_descriptor(spec, tensors)


def _buffers(pools: Pools) -> list[torch.Tensor]:
    dev = pools.device
    return list(dev.kv_buffer) if pools.mla else [*dev.k_buffer, *dev.v_buffer]


def _locs(pages: list[int]) -> torch.Tensor:
    return (torch.tensor(pages)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)


@pytest.mark.parametrize(("name", "mla", "hnd", "shape"), CASES)
def test_device_pool_gathers_and_scatters_like_sglang_writes(name, mla, hnd, shape, monkeypatch) -> None:
    pools = _pool(mla, hnd, monkeypatch)
    assert [tuple(b.shape) for b in _buffers(pools)] == [shape] * len(_buffers(pools)), "SGLang's own layout switch"
    if not mla:
        assert pools.device.kv_cache_layout == ("hnd" if hnd else "nhd")
    data = random_tokens(pools, len(PAGES) * PAGE, torch.Generator().manual_seed(len(name)))
    write_tokens(pools, _locs(PAGES), data)
    descriptor = _bind(name, pools)
    count = len(PAGES) * PAGE
    chunk = torch.empty(descriptor.canonical_bytes(count), dtype=torch.uint8)
    TorchBackend().gather(descriptor, PAGES, chunk, count)
    assert torch.equal(chunk, expected_chunk(pools, data)), f"{name}: gathered bytes differ from the tokens written"

    # Scatter into other pages of a fresh pool; SGLang writes the same tokens into the same pages of another.
    other = [3, 7, 1]
    ours, theirs = _pool(mla, hnd, monkeypatch), _pool(mla, hnd, monkeypatch)
    TorchBackend().scatter(chunk, _bind(name, ours), other, count)
    write_tokens(theirs, _locs(other), data)
    for got, want in zip(_buffers(ours), _buffers(theirs)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{name}: scatter unlike SGLang's write"


def test_hnd_spec_refuses_the_nhd_pool(monkeypatch) -> None:
    """The layout is never guessed from shapes: an NHD pool bound as HND (or the reverse) is refused at bind."""
    from kvport.layouts import LayoutError

    with pytest.raises(LayoutError, match="sglang-mha-hnd"):
        _bind("sglang-mha-hnd", _pool(False, False, monkeypatch))
    with pytest.raises(LayoutError, match="sglang-mha"):
        _bind("sglang-mha", _pool(False, True, monkeypatch))
