"""The only stand-ins the engine truth tests use: vLLM's GPU-only KV write kernels re-implemented on CPU by the
contract their source documents. Must not stand in for engine code that decides where a token's K/V goes (the
backends' own code does that: it builds the cache views these kernels write through)."""

from __future__ import annotations

import torch

_LIB = None  # the torch.library fragment that holds the CPU kernels; kept alive for the process


def quantized(x: torch.Tensor, kv_cache_dtype: str, scale: float, like: torch.Tensor) -> torch.Tensor:
    """What vLLM's cache kernels store for ``x`` in a cache of ``like``'s dtype (csrc/cache_kernels.cu): the value
    itself for "auto", else fp8 of ``x / scale`` (per-tensor scale), as raw bytes when the cache is uint8."""
    if kv_cache_dtype == "auto":
        return x.to(like.dtype)
    fp8 = torch.float8_e5m2 if kv_cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    q = (x.float() / scale).to(fp8)
    return q.view(torch.uint8) if like.dtype == torch.uint8 else q.to(like.dtype)


def _valid(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    slots = slot_mapping.flatten().long()
    rows = (slots >= 0).nonzero().flatten()  # padding tokens carry slot -1 and are skipped
    return rows, slots[rows] // block_size, slots[rows] % block_size


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """csrc/cache_kernels.cu reshape_and_cache_flash: key_cache / value_cache are [blocks, block_size, heads, head]
    (any strides); token i goes to block slot_mapping[i] // block_size, offset slot_mapping[i] % block_size."""
    rows, blk, off = _valid(slot_mapping, key_cache.shape[1])
    key_cache[blk, off] = quantized(key[rows], kv_cache_dtype, float(k_scale), key_cache)
    value_cache[blk, off] = quantized(value[rows], kv_cache_dtype, float(v_scale), value_cache)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """csrc/cache_kernels.cu reshape_and_cache (the paged-attention layout): key_cache is
    [blocks, heads, head/x, block_size, x], value_cache [blocks, heads, head, block_size]."""
    rows, blk, off = _valid(slot_mapping, value_cache.shape[3])
    heads, pieces, _, x = key_cache.shape[1:]
    k = quantized(key[rows], kv_cache_dtype, float(k_scale), key_cache).reshape(-1, heads, pieces, x)
    key_cache.permute(0, 3, 1, 2, 4)[blk, off] = k
    value_cache.permute(0, 3, 1, 2)[blk, off] = quantized(value[rows], kv_cache_dtype, float(v_scale), value_cache)


def triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """v1/attention/ops/triton_reshape_and_cache_flash.py: the head-major x-packed layout when key_cache is 5-D,
    else the flash layout; same token placement as the CUDA kernels."""
    write = reshape_and_cache if key_cache.dim() == 5 else reshape_and_cache_flash
    write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)


def concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    """csrc/cache_kernels.cu concat_and_cache_mla: kv_cache is [blocks, block_size, kv_lora_rank + rope]; a token's
    row is its kv_c followed by its k_pe."""
    rows, blk, off = _valid(slot_mapping, kv_cache.shape[1])
    latent = torch.cat([kv_c[rows], k_pe[rows].reshape(rows.numel(), -1)], dim=-1)
    kv_cache[blk, off] = quantized(latent, kv_cache_dtype, float(scale), kv_cache)


_SCHEMAS = {
    "reshape_and_cache_flash": (
        "reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()",
        reshape_and_cache_flash,
    ),
    "reshape_and_cache": (
        "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()",
        reshape_and_cache,
    ),
    "concat_and_cache_mla": (
        "concat_and_cache_mla(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, "
        "str kv_cache_dtype, Tensor scale) -> ()",
        concat_and_cache_mla,
    ),
}


def install_vllm_cache_ops() -> list[str]:
    """Define vLLM's CUDA/ROCm cache write ops (torch.ops._C_cache_ops.*) on CPU where the build lacks them; returns
    the ones defined here. vLLM's CPU build ships none of them (its own CPU backends write with their own ops)."""
    global _LIB
    missing = [name for name in _SCHEMAS if not _has_op("_C_cache_ops", name)]
    if missing:
        _LIB = _LIB or torch.library.Library("_C_cache_ops", "FRAGMENT")
        for name in missing:
            schema, fn = _SCHEMAS[name]
            _LIB.define(schema)
            _LIB.impl(name, fn, "CPU")
    return missing


def _has_op(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def patch_vllm_gpu_writers() -> list[str]:
    """Point vLLM's backend modules at the CPU kernels where the CPU build leaves a GPU-only writer unset: the CUDA
    op wrappers stay vLLM's (vllm._custom_ops), only the kernels under them are the ones above; the Triton writer
    (a Python launcher of a GPU-only Triton kernel) is replaced by its contract. Returns what was patched."""
    import importlib

    from vllm import _custom_ops

    install_vllm_cache_ops()
    patched = []
    flash = importlib.import_module("vllm.v1.attention.backends.flash_attn")
    if not hasattr(flash, "reshape_and_cache_flash"):
        flash.reshape_and_cache_flash = _custom_ops.reshape_and_cache_flash
        patched.append("flash_attn.reshape_and_cache_flash")
    paged = importlib.import_module("vllm.v1.attention.ops.paged_attn")
    if not hasattr(paged, "ops"):
        paged.ops = _custom_ops
        patched.append("paged_attn.ops")
    for name in ("triton_attn", "rocm_attn", "rocm_segmented_attn"):
        module = importlib.import_module(f"vllm.v1.attention.backends.{name}")
        if getattr(module, "triton_reshape_and_cache_flash", None) is not triton_reshape_and_cache_flash:
            module.triton_reshape_and_cache_flash = triton_reshape_and_cache_flash
            patched.append(f"{name}.triton_reshape_and_cache_flash")
    return patched
