"""Builds a small random-weight Llama and a word-level tokenizer on disk, deterministically and without downloads.
Owns the demo model's dimensions and vocabulary; must not import transformers/tokenizers at module import."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# A few hundred plain words: every one is a single token of the word-level tokenizer, so a prompt of N words is
# exactly N tokens (plus BOS), which lets the demo and the tests choose prompt lengths exactly.
_WORDS = (
    "the of and to in is was for on that with as by at from his her their this which are be an or had not "
    "but have were one all they she he it we you there been has more when will would who so no if out up "
    "about into them than then its over only other new some could time these two may first any like our "
    "after most also made many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three states himself few house use during without again place "
    "american around however home small found thought went say part once general high upon school every "
    "does got united left number course war until always away something fact though water less public put "
    "think almost hand enough far took head yet government system better set told nothing night end why "
    "called didn eyes find going look asked later point knew city next program business give group toward "
    "young days let room president side social present given several order national possible rather second "
    "face per among form important often things looked early white case john become large big need four "
    "within felt along children saw best church ever least power development light thing seemed family "
    "interest want members mind country area others done turned although open god service certain kind "
    "problem began different door thus help sense means whole matter perhaps itself york times law human "
    "line above name example action company hands local show whether five history gave today either act "
    "feet across taken past quite anything seen having death week experience body word half really field "
    "question answer document report summary agent tool retrieval context cache token layer block engine"
).split()

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
PUNCTUATION = (".", ",", "?", ":", ";", "!")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Dimensions of the random Llama. Defaults were picked on the 2-core dev VM so that a 3000-token prefill
    takes seconds (visible) while the whole demo stays within a few minutes; see docs/performance.md."""

    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 1024
    max_positions: int = 8192
    # transformers' default 0.02 gives a random model whose greedy output ignores its input (one token repeated);
    # 0.1 makes attention sharp enough that outputs depend on the prompt and on the KV actually loaded.
    init_std: float = 0.1
    seed: int = 0
    # 0: every layer attends to all tokens. N > 0: odd layers attend to the last N tokens only (a hybrid full +
    # sliding-window model, as Gemma's; vLLM gives it two KV cache groups).
    sliding_window: int = 0

    def tag(self) -> str:
        tag = f"l{self.layers}-h{self.hidden}-a{self.heads}-kv{self.kv_heads}-i{self.intermediate}-v{self.vocab}"
        return f"{tag}-sw{self.sliding_window}" if self.sliding_window else tag


def vocabulary() -> list[str]:
    """Special tokens, punctuation, then the word list, each exactly once, in a fixed order."""
    seen: dict[str, None] = {}
    for item in (*SPECIAL_TOKENS, *PUNCTUATION, *_WORDS):
        seen.setdefault(item, None)
    return list(seen)


def build_model(dest: str | os.PathLike, dims: ModelDims | None = None) -> Path:
    """Write config, bf16 safetensors weights and tokenizer files into ``dest`` (reused when already complete).

    The directory is built under a temporary name and renamed into place, so a crash never leaves a half model.
    """
    dims = dims or ModelDims()
    dest = Path(dest)
    stamp = dest / "kvport-demo.json"
    wanted = {**dataclasses.asdict(dims), "chat_template": chat_template()}
    if not dims.sliding_window:  # stamps written before the field existed stay valid
        del wanted["sliding_window"]
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return dest
    words = vocabulary()
    if dims.vocab < len(words):
        raise ValueError(f"demo model vocab {dims.vocab} is smaller than the tokenizer's {len(words)} words")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _write_tokenizer(tmp, words)
        _write_weights(tmp, dims)
        (tmp / "kvport-demo.json").write_text(json.dumps(wanted))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_tokenizer(dest: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with spaces and handles "##"-free vocabularies as plain words.
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.model_max_length = 1 << 20
    # Saved into tokenizer_config.json, so vLLM's /v1/chat/completions works without --chat-template.
    fast.chat_template = chat_template()
    fast.save_pretrained(str(dest))


def chat_template_path() -> Path:
    """The demo model's chat template (Jinja), also usable with vLLM's ``--chat-template``."""
    return Path(__file__).with_name("chat_template.jinja")


def chat_template() -> str:
    return chat_template_path().read_text()


def _write_weights(dest: Path, dims: ModelDims) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=dims.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=dims.init_std,
        torch_dtype="bfloat16",
    )
    if dims.sliding_window:  # read per layer by vLLM's Llama (layer_types); the weights do not change
        config.layer_types = ["sliding_attention" if i % 2 else "full_attention" for i in range(dims.layers)]
        config.sliding_window = dims.sliding_window
    torch.manual_seed(dims.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(dest), safe_serialization=True)


def make_text(num_words: int, seed: int) -> str:
    """Deterministic pseudo-English: ``num_words`` vocabulary words with a period every ~12 words."""
    rng = random.Random(seed)
    pool = _WORDS
    out = []
    for i in range(num_words):
        out.append(rng.choice(pool))
        if i % 12 == 11:
            out[-1] += " ."
    return " ".join(out)
