"""Tiny chat models for the post-training tests: a BPE tokenizer trained in milliseconds on task text
and a random tiny DeepSeek-V3 (every V3 feature) saved in the HF layout with that tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_config

from dsv3 import Transformer, save_pretrained
from dsv3.tasks import Arithmetic, Brackets, Sort, problems
from dsv3.tokenizer import Tokenizer, train_tokenizer

VOCAB = 320


def tiny_tokenizer() -> Tokenizer:
    texts = []
    for task in (Arithmetic(), Sort(), Brackets()):
        texts += [f"{p.prompt} {p.reasoning} {p.answer}" for p in problems(task, 100, 0)]
    texts += ["You are a helpful assistant. Hello there, how are you? I am fine. weather in Paris is sunny"] * 3
    return train_tokenizer(texts, vocab_size=VOCAB)


def tiny_chat_model(path: Path, seed: int = 0, head_scale: float = 1.0, **overrides) -> tuple[Path, Tokenizer]:
    """Save a random tiny model + tokenizer under ``path``; returns (path, tokenizer).

    ``head_scale`` multiplies the output head: a peaked next-token distribution (a few likely tokens),
    like a trained model's, instead of the near-uniform one of a fresh initialization."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=VOCAB, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **overrides)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    save_pretrained(model, path)
    tok.save(path)
    return Path(path), tok
