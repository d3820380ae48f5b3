"""Device: are layers evenly spaced in memory (what 2D copy-engine copies across layers need), for the benchmark's
allocation and for one torch.zeros per layer (vLLM's)? Raw output: docs/bench/layer-spacing-h200-n.txt."""

import torch
from kvport.hal.transfer.pitched import pitched_template

from kvport.bench._kernel_cases import sized_layout
from kvport.hal.transfer.regions import region_template
from kvport.layouts import allocate

dims = {"layers": 32, "kv_heads": 8, "head_dim": 128}
for name in ("vllm-mla", "deepseek-v4", "vllm-flash-nhd", "vllm-flash-hnd", "sglang-mla"):
    try:
        spec = sized_layout(name, dims)
        blocks = [4096 // g.tokens_per_block + 8 for g in spec.groups]
        kv = allocate(spec, blocks if len(blocks) > 1 else blocks[0], device="cuda", fill="zeros")
        d = kv.descriptor
        ptrs = [s.base_ptr for s in d.streams]
        steps = sorted(set(b - a for a, b in zip(ptrs, ptrs[1:])))
        t = pitched_template(d, 256)
        print(
            name,
            "streams",
            len(d.streams),
            "regions",
            int(region_template(d, 256).size.numel()),
            "copies",
            None if t is None else len(t.width),
            "distinct steps",
            steps[:6],
            flush=True,
        )
        del kv
        torch.cuda.empty_cache()
    except Exception as e:
        print(name, "ERROR", e)
# vLLM v1 style: one torch.zeros(int8) per layer of the same size, back to back.
for mib in (18, 576):  # 4608 MiB x 32 did not fit the H200 (the raw file ends with that error)
    ts = [torch.zeros(mib << 20, dtype=torch.int8, device="cuda") for _ in range(32)]
    p = [t.data_ptr() for t in ts]
    print("vllm-like", mib, "MiB x 32: distinct steps", sorted(set(b - a for a, b in zip(p, p[1:]))))
    del ts
    torch.cuda.empty_cache()
