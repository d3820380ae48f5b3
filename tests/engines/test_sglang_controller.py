"""kvport's storage backend driven by SGLang 0.5.23's own HiCacheController on the CPU: attached through
--hicache-storage-backend dynamic's code path, written by its backup thread (batch_set_v1), found by its prefetch
thread with SGLang's own page hashes of the token ids (batch_exists) and read back by its I/O thread (batch_get_v1).
The radix cache's part (allocating host rows for a hit) is done here, with the controller's own allocator."""

from __future__ import annotations

import threading
import types

import pytest

pytestmark = pytest.mark.sglang

from sglang_env import import_sglang  # noqa: E402

import_sglang()

import torch  # noqa: E402
from sglang_env import build_pools, device_to_host, host_rows, random_tokens, write_tokens  # noqa: E402

PAGE = 16
TIMEOUT_S = 30  # each queue wait; the whole flow takes well under a second on the 2-core dev VM


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """The controller's tp group: a one-rank gloo group (file rendezvous, no network)."""
    path = tmp_path_factory.mktemp("pg") / "rendezvous"
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield torch.distributed.group.WORLD
    torch.distributed.destroy_process_group()


def one_rank_server():
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().override(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0, dcp_enabled=False
    )


@pytest.mark.parametrize("layout", ["layer_first", "page_first_direct"])
def test_controller_backs_up_and_prefetches_through_kvport(tmp_path, process_group, layout: str) -> None:
    from sglang.srt.managers.cache_controller import HiCacheController

    pools = build_pools(False, layout, page_size=PAGE)
    extra = {
        "backend_name": "kvport",
        "module_path": "kvport.engines.sglang",
        "class_name": "KVPortHiCacheStorage",
        "interface_v1": 1,
        "l1_bytes": "16MiB",
        "tiers": [{"type": "local_disk", "path": str(tmp_path / "l2"), "bytes": "64MiB"}],
    }
    allocator = types.SimpleNamespace(get_kvcache=lambda: pools.device)  # only get_kvcache is read
    gen = torch.Generator().manual_seed(11)
    data = random_tokens(pools, 3 * PAGE, gen)
    locs = torch.arange(PAGE, 4 * PAGE)
    write_tokens(pools, locs, data)
    tokens = list(range(500, 500 + 3 * PAGE))
    with one_rank_server():
        controller = HiCacheController(
            allocator,
            pools.host,
            PAGE,
            process_group,
            threading.Event(),
            io_backend="direct",
            storage_backend="dynamic",
            model_name="test-model",
            storage_backend_extra_config=extra,
        )
        try:
            assert type(controller.storage_backend).__name__ == "KVPortHiCacheStorage"
            assert controller.page_set_func == controller._page_set_zero_copy  # interface_v1 was honoured
            host_indices = pools.host.alloc(3 * PAGE)
            device_to_host(pools, locs, host_indices)
            from sglang.srt.mem_cache.utils import get_hash_str

            op_id = controller.write_storage(host_indices, tokens, hash_value=get_hash_str(tokens, None, PAGE))
            done = controller.ack_backup_queue.get(timeout=TIMEOUT_S)
            assert done.id == op_id and done.completed_tokens == 3 * PAGE

            # A longer request with the same prefix: the controller hashes the tokens itself.
            controller.prefetch("req-1", tokens + [7, 8, 9])
            hit = controller.prefetch_hit_queue.get(timeout=TIMEOUT_S)
            assert hit.storage_hit_count == 3 * PAGE
            hit.host_indices = controller.alloc_prefetch_host_buffers(hit, hit.storage_hit_count)
            assert not set(hit.host_indices.tolist()) & set(host_indices.tolist())
            controller.prefetch_buffer.put(hit)
            acks = [controller.ack_prefetch_queue.get(timeout=TIMEOUT_S)]
            while not acks[-1].completed_req:
                acks.append(controller.ack_prefetch_queue.get(timeout=TIMEOUT_S))
            assert max(a.completed_tokens or 0 for a in acks) == 3 * PAGE
            for layer in range(pools.host.layer_num):
                for comp in range(2):
                    got = host_rows(pools.host, layer, comp, hit.host_indices)
                    assert torch.equal(got, data[layer][comp]), (layer, comp)

            # A prompt whose first page differs shares no key: nothing is found.
            controller.prefetch("req-2", [1] + tokens[1:])
            miss = controller.prefetch_hit_queue.get(timeout=TIMEOUT_S)
            assert miss.storage_hit_count == 0
        finally:
            controller.detach_storage_backend()
