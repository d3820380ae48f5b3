"""Run as a script by test_vllm_deepseek_v4.py, in its own process: vLLM's CPU worker patches torch at import
(vllm.v1.worker.cpu.shm: no-op streams, events and pin_memory), which must not leak into other tests. Builds a tiny
DeepSeek V4's attention layers with vLLM's own classes, lets vLLM group, lay out and allocate their caches, binds
kvport's vLLM adapter to them and prints what happened as one JSON line. usage: vllm_dsv4_probe.py DIR OPTIONS_JSON"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

# A tiny DeepSeek V4: window-only, 4x- and 128x-compressed layers (compress_ratios 0 / 4 / 128), the indexer on the
# 4x layers. No weights are loaded: only the attention layers are built.
TINY = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_lora_rank": 128,
    "o_groups": 2,
    "sliding_window": 128,
    "compress_ratios": [0, 4, 128, 4],
    "compress_rope_theta": 160000.0,
    "rope_theta": 10000.0,
    "index_n_heads": 8,
    "index_head_dim": 128,
    "index_topk": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "num_hash_layers": 1,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 2,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
}


def allocated(model_dir: str):
    """(vLLM config, its KVCacheConfig, the KV tensors register_kv_caches would receive, the resolved layout)."""
    import torch
    from vllm.config import get_layers_from_vllm_config, set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.models.deepseek_v4.cpu.cpu_sparse import DeepseekV4CPUAttention
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.kv_cache_interface import AttentionSpec
    from vllm.v1.worker.utils import allocate_kv_cache, customize_attention_spec

    args = EngineArgs(
        model=model_dir,
        skip_tokenizer_init=True,
        load_format="dummy",
        max_model_len=1024,
        enforce_eager=True,
        max_num_batched_tokens=1024,
        max_num_seqs=4,
    )
    cfg = args.create_engine_config()
    with set_current_vllm_config(cfg):
        for i in range(TINY["num_hidden_layers"]):
            DeepseekV4CPUAttention(vllm_config=cfg, prefix=f"model.layers.{i}.attn")
        # vLLM's model runner's loop (GPUModelRunner.get_kv_cache_spec): every layer's spec, as its backend has it.
        specs, backends = {}, {}
        for name, layer in get_layers_from_vllm_config(cfg, cast(type[Any], AttentionLayerBase)).items():
            spec = layer.get_kv_cache_spec(cfg)
            if spec is None:
                continue
            if isinstance(spec, AttentionSpec):
                spec = customize_attention_spec(layer.get_attn_backend(), spec)
            specs[name], backends[name] = spec, layer.get_attn_backend()
        unique = list({b.full_cls_name(): b for b in backends.values()}.values())
        supported = [layout.name for layout in get_supported_kv_cache_layouts(unique)]
        layout = resolve_kv_cache_layout(cfg, [supported], specs.values())
        kv_cache_config = get_kv_cache_configs(cfg, [specs], [64 << 20])[0]
        kv = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout, None)
    return cfg, kv_cache_config, kv, layout


def layer_specs(kv_cache_config) -> list:
    """Every layer's spec (a group of several spec types holds them in ``kv_cache_specs``)."""
    out = []
    for group in kv_cache_config.kv_cache_groups:
        inner = getattr(group.kv_cache_spec, "kv_cache_specs", None)
        out += list(inner.values()) if inner else [group.kv_cache_spec]
    return out


def main() -> None:
    import vllm.v1.worker.cpu.shm  # noqa: F401  (what vLLM's CPU worker imports first: cpu_worker.py)
    from vllm.config import set_current_vllm_config
    from vllm_stack import single_rank  # beside this script, so on sys.path when it runs

    from kvport.engines.vllm_layouts import descriptor_for
    from kvport.engines.vllm_setup import attention_infos
    from kvport.errors import UserError

    model_dir, options = sys.argv[1], json.loads(sys.argv[2])
    with open(f"{model_dir}/config.json", "w") as f:
        json.dump(TINY, f)
    with single_rank():
        cfg, kv_cache_config, kv, layout = allocated(model_dir)
        out: dict[str, Any] = {
            "layout": layout.name,
            "groups": len(kv_cache_config.kv_cache_groups),
            "storages": len({t.untyped_storage().data_ptr() for t in kv.values()}),
            "tokens_per_state": sorted({getattr(s, "tokens_per_state", 1) for s in layer_specs(kv_cache_config)}),
        }
        try:
            with set_current_vllm_config(cfg):
                descriptor_for(attention_infos(cfg, kv_cache_config), kv, options)
            out["refused"] = None
        except UserError as exc:
            out["refused"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
