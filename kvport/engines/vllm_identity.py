"""What makes one vLLM shard's KV different from another's, as key material: the weights on disk, the layers a pipeline
stage holds, and per request what vLLM's own block hashes carry beyond token ids. Must not import vLLM at import time.

Chunk keys (kvport.store.keys) are a hash chain over token ids rooted in a namespace (the shard: see
``kvport.engines.key_namespace.namespace_for``) and a per-request extra (``request_extra``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_log = logging.getLogger("kvport.vllm")

# Weights up to this size are fingerprinted by content (xxh3-128 of every byte): 3.9-4.0 GB/s from the page cache on
# the 2-core dev VM, so 1 GiB costs ~0.27 s at start-up (vLLM has just read the files, so they are usually cached).
# Larger weights are fingerprinted by name, size, modification time and safetensors header: a rebuild at the same
# path changes the mtime; a copy to another machine does too (set the `namespace` option to share across machines).
CONTENT_HASH_MAX_BYTES = 1 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".pdparams", ".npz")
# Files besides the weights whose content changes the model's numerics.
CONFIG_FILES = ("config.json", "params.json", "quant_config.json", "hf_quant_config.json")
# A safetensors header is 8 bytes of length then JSON; headers past this are not read (a damaged or hostile file).
MAX_SAFETENSORS_HEADER = 100 << 20


def weights_files(root: Path) -> list[Path]:
    """The files whose bytes define the model: config files and weight files (top level and one folder down)."""
    if root.is_file():
        return [root]
    found = []
    for path in sorted(root.glob("*")) + sorted(root.glob("*/*")):
        if path.is_file() and (path.name in CONFIG_FILES or path.name.endswith(WEIGHT_SUFFIXES)):
            found.append(path)
    return found


def weights_digest(root: str | os.PathLike) -> str:
    """``content:<hex>`` or ``stat:<hex>`` for the model files under ``root`` (a directory or one file)."""
    root = Path(root)
    files = weights_files(root)
    if not files:
        return "none"
    total = sum(p.stat().st_size for p in files)
    by_content = total <= CONTENT_HASH_MAX_BYTES
    import xxhash

    h = hashlib.blake2b(digest_size=16)
    for path in files:
        st = path.stat()
        name = str(path.relative_to(root)) if root.is_dir() else path.name
        _update(h, name.encode("utf-8", "surrogateescape"), struct.pack("<Q", st.st_size))
        if by_content or path.name in CONFIG_FILES:
            content = xxhash.xxh3_128()
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    content.update(block)
            _update(h, content.digest())
        else:
            _update(h, struct.pack("<q", st.st_mtime_ns), _safetensors_header(path))
    return ("content:" if by_content else "stat:") + h.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    if path.suffix != ".safetensors":
        return b""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return b""
        (length,) = struct.unpack("<Q", raw)
        return f.read(min(length, MAX_SAFETENSORS_HEADER))


def _update(h, *parts: bytes) -> None:
    for part in parts:
        h.update(struct.pack("<Q", len(part)))  # length-prefixed: no two sequences of parts hash alike
        h.update(part)


def resolve_weights(model: str, revision: str | None) -> Path | None:
    """The local directory (or file) vLLM loads ``model`` from: the path itself, or the Hugging Face cache snapshot
    of a hub id at ``revision``; None when neither is on this machine."""
    if os.path.exists(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not a hub id, or not in the local cache
        return None


def request_extra(request: Any) -> bytes:
    """A digest of what vLLM's block hashes of ``request`` carry beyond token ids (vllm/v1/core/kv_cache_utils.py
    generate_block_hash_extra_keys): the LoRA adapter (name and path), the cache salt, every multimodal input (its
    hash, offset and length) and the prompt embeddings; b"" when there is none. It roots the request's key chain, so
    requests that differ in any of them never share a chunk. Stricter than vLLM (which keys these per block): two
    requests with the same leading image but different later inputs share nothing."""
    parts: list[Any] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(["lora", str(lora.lora_name), str(getattr(lora, "lora_path", "") or "")])
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(["cache_salt", str(salt)])
    for feature in getattr(request, "mm_features", None) or ():
        position = feature.mm_position
        parts.append(["mm", str(feature.identifier), int(position.offset), int(position.length)])
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is not None:
        parts.append(["prompt_embeds", *_tensor_digest(embeds)])
        mask = getattr(request, "prompt_is_token_ids", None)
        if mask is not None:
            parts.append(["prompt_is_token_ids", "".join("1" if m else "0" for m in mask)])
    if not parts:
        return b""
    blob = json.dumps(parts, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.blake2b(blob, digest_size=32).digest()


def _tensor_digest(tensor: Any) -> list[Any]:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return [str(tensor.dtype), list(tensor.shape), hashlib.sha256(memoryview(flat.numpy())).hexdigest()]


def prompt_of(request: Any) -> Sequence[int]:
    """The prompt's token ids as vLLM hashes them: the ids, or zeros where only embeddings were given."""
    ids = getattr(request, "prompt_token_ids", None)
    if ids is not None:
        return ids
    return list(request.all_token_ids[: request.num_prompt_tokens])


def tp_rank_world(worker: bool) -> tuple[int, int]:
    """This process's tensor-parallel rank and size (a scheduler process is not a shard: 0, 1)."""
    if not worker:
        return 0, 1
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def worker_namespace(vllm_config: Any, options: dict[str, Any], fingerprint: str, layers: list[str]) -> str:
    """This worker shard's namespace (kvport.engines.key_namespace.namespace_for): model, weights, config, KV dtype,
    layout fingerprint, TP rank/size, pipeline stage and the layer indices it holds."""
    from vllm.distributed.parallel_state import get_pp_group

    from kvport.engines.key_namespace import layer_span, namespace_for
    from kvport.engines.vllm_layouts import layer_index

    model = vllm_config.model_config
    dtype = vllm_config.cache_config.cache_dtype
    if dtype == "auto":
        dtype = str(model.dtype).removeprefix("torch.")
    rank, world = tp_rank_world(True)
    pp = get_pp_group()
    base = options.get("namespace")
    weights = config = ""
    if not base:
        root = resolve_weights(model.model, model.revision)
        if root is None:
            weights = "unresolved"
            _log.warning(
                "kvport: the weights of %s are not on this machine's disk to fingerprint; keys hold its name and "
                "revision only: set the `namespace` option and change it whenever the weights change",
                model.model,
            )
        else:
            weights = weights_digest(root)
        config = _config_digest(model)
    return namespace_for(
        model.model,
        model.revision,
        dtype,
        rank,
        world,
        base,
        weights=weights,
        config=config,
        layout=fingerprint,
        pp_rank=pp.rank_in_group,
        pp_world=pp.world_size,
        layers=layer_span(layer_index(n) for n in layers),
    )


def _config_digest(model: Any) -> str:
    """The effective model config (after vLLM's and the user's overrides), model dtype and quantization method."""
    hf_config = getattr(model, "hf_config", None)
    text = hf_config.to_json_string(use_diff=False) if hf_config is not None else ""
    blob = json.dumps([text, str(model.dtype), str(getattr(model, "quantization", None))])
    return hashlib.blake2b(blob.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
