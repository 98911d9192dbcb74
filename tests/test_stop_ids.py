"""Tokenizer.stop_ids (the one rule for which ids end a reply) and dsv3.tasks.completion_text."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import models

from dsv3.tasks import completion_text
from dsv3.tokenizer import BOS_TOKEN, EOS_TOKEN, THINK_END, USER_TOKEN, Tokenizer, train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "the answer is 42", "print('hello world')\n"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXTS, vocab_size=400)


def bare_tokenizer() -> Tokenizer:
    """A vocabulary with only BOS and EOS among our specials (no ``<｜User｜>``)."""
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    return Tokenizer(backend)


def test_stop_ids_are_eos_and_the_next_user_turn(tok):
    eos, user = tok.token_id(EOS_TOKEN), tok.token_id(USER_TOKEN)
    assert eos != user
    assert tok.stop_ids() == tuple(sorted((eos, user)))
    assert tok.stop_ids(eos=False) == (user,)
    assert tok.stop_ids(extra=(None, 7, eos)) == tuple(sorted({eos, user, 7}))


def test_stop_ids_without_a_user_token():
    t = bare_tokenizer()
    with pytest.raises(KeyError):
        t.token_id(USER_TOKEN)
    assert t.stop_ids() == (t.token_id(EOS_TOKEN),)
    assert t.stop_ids(eos=False) == ()


def test_completion_text_drops_only_a_final_stop_token(tok):
    body = tok.encode("the answer") + [tok.token_id(THINK_END)] + tok.encode(" 42")
    want = tok.decode(body)
    assert THINK_END in want                                     # special tokens are spelled out
    assert completion_text(tok, body + [tok.eos_id]) == want
    assert completion_text(tok, body + [tok.token_id(USER_TOKEN)]) == want
    assert completion_text(tok, body) == want                   # cut off by max_tokens: nothing to drop
    assert completion_text(tok, [tok.eos_id] + body) == tok.decode([tok.eos_id] + body)
    assert completion_text(tok, []) == ""
