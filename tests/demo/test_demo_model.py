"""The demo's random Llama and word-level tokenizer: built locally, deterministic, exact token counts.
Needs transformers/tokenizers (installed with vLLM), so it runs in the e2e session."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from kvport.demo.model import ModelDims, build_model, make_text, vocabulary

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed"),
]

TINY = ModelDims(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_offline(tmp_path) -> None:
    a = build_model(tmp_path / "a", TINY)
    b = build_model(tmp_path / "b", TINY)
    assert _digest(a / "model.safetensors") == _digest(b / "model.safetensors")
    assert _digest(a / "tokenizer.json") == _digest(b / "tokenizer.json")
    config = json.loads((a / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 128, 2)
    other = build_model(tmp_path / "c", ModelDims(**{**TINY.__dict__, "seed": 1}))
    assert _digest(other / "model.safetensors") != _digest(a / "model.safetensors")


def test_build_reuses_a_complete_model_and_rebuilds_on_new_dims(tmp_path) -> None:
    path = build_model(tmp_path / "m", TINY)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert (build_model(tmp_path / "m", TINY) / "model.safetensors").stat().st_mtime_ns == stamp
    bigger = ModelDims(**{**TINY.__dict__, "layers": 3})
    build_model(tmp_path / "m", bigger)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"


def test_one_word_is_one_token(tmp_path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_model(tmp_path / "m", TINY)))
    text = make_text(120, seed=3)
    ids = tok(text).input_ids
    assert len(ids) == len(text.split())
    assert tok.unk_token_id not in ids
    assert max(ids) < len(vocabulary()) <= TINY.vocab
    assert make_text(120, seed=3) == text and make_text(120, seed=4) != text
