"""Stop strings in the engine: matched once, incrementally, on the sequence (``Sequence.match_stop``).

The reference is the rule stated plainly: after each token, decode the whole output and stop at the
first token whose text contains a stop string, cutting the text before the earliest match. Texts
hold multi-byte UTF-8 characters that byte-level BPE splits across tokens, and stop strings that
span token boundaries.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import far_from_ties_, tiny_config

import dsv3
from dsv3.engine import LLM, SamplingParams
from dsv3.engine.sequence import Sequence
from dsv3.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["the engine reads STOP and writes one token", "naïve café ✓ über 日本語 🙂 done",
         "def step(self, batch):\n    return batch  # ✓✓ 🙂🙂", "ééé → ★ ☃ end of line\nnext"]


@pytest.fixture(scope="module")
def tok():
    # Small vocabulary, ASCII-heavy corpus: the rarer characters stay split into byte tokens.
    return train_tokenizer([" ".join(TEXTS[:1]) * 20 + "the engine reads a prompt " * 30], vocab_size=300)


def reference(tok, ids: list[int], stops: list[str]) -> tuple[int, int | None]:
    """(tokens kept, text length) by decoding the whole output after every token."""
    for i in range(1, len(ids) + 1):
        text = tok.decode(ids[:i], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return i, min(hits)
    return len(ids), None


def incremental(tok, ids: list[int], stops: list[str]) -> tuple[int, int | None]:
    seq = Sequence(0, [1], SamplingParams(stop=stops))
    for tok_id in ids:
        seq.output.append(tok_id)
        if seq.match_stop(tok):
            break
    return len(seq.output), seq.stop_text_len


def test_texts_split_characters_across_tokens(tok):
    """The premise of the tests below: some tokens end inside a UTF-8 character."""
    split = [t for t in TEXTS for i in tok.encode(t) if "\ufffd" in tok.decode([i])]
    assert len(split) >= 3


@pytest.mark.parametrize("text", TEXTS)
def test_match_stop_equals_whole_text_matching(tok, text):
    ids = tok.encode(text)
    rng = random.Random(len(text))
    cases = [["STOP"], ["✓"], ["🙂"], ["é"], ["日本"], ["zzz"], ["ne", "e r"], [text], [text[-1]]]
    for _ in range(25):                                   # random substrings: most span token boundaries
        a = rng.randrange(len(text))
        cases.append([text[a:a + rng.randint(1, 6)], "absent"])
    for stops in cases:
        assert incremental(tok, ids, stops) == reference(tok, ids, stops), stops


def test_stop_text_len_counts_characters_before_the_match(tok):
    ids = tok.encode("naïve café ✓ über")
    kept, cut = incremental(tok, ids, ["✓ ü"])
    assert tok.decode(ids, skip_special_tokens=True)[:cut] == "naïve café "
    assert "✓ ü" in tok.decode(ids[:kept]) and "✓ ü" not in tok.decode(ids[:kept - 1])


@pytest.fixture(scope="module")
def llm(tok):
    torch.manual_seed(0)
    model = far_from_ties_(dsv3.Transformer(tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=1)))
    return LLM(model, tokenizer=tok, max_model_len=256, max_num_seqs=4)


def forcing(ids: list[int]):
    """A logits processor that makes the model write ``ids`` (then anything)."""
    def force(output_ids, logits):
        if len(output_ids) >= len(ids):
            return logits
        out = torch.full_like(logits, float("-inf"))
        out[ids[len(output_ids)]] = 0.0
        return out
    return force


def test_engine_cuts_at_stop_strings_in_a_batch(tok, llm):
    """Several requests at once, each with its own stop strings: tokens up to the one that completes
    the match, text cut before it, finish_reason "stop"; requests without a match run to max_tokens."""
    prompt = [tok.bos_id] + tok.encode("the engine")
    cases = [("naïve café ✓ über 日本語", ["✓ ü"]), ("ééé → ★ ☃ end", ["★ ☃", "→"]),
             ("the engine reads STOP and", ["reads S", "zzz"]), ("plain text here", ["absent"])]
    params = [SamplingParams(temperature=0, max_tokens=len(tok.encode(t)), stop=s, ignore_eos=True,
                             logits_processors=[forcing(tok.encode(t))]) for t, s in cases]
    outs = llm.generate([prompt] * len(cases), params)
    for (text, stops), out in zip(cases, outs):
        ids = tok.encode(text)
        kept, cut = reference(tok, ids, stops)
        assert out.token_ids == ids[:kept]
        full = tok.decode(ids, skip_special_tokens=True)
        assert out.text == (full[:cut] if cut is not None else full)
        assert out.finish_reason == ("stop" if cut is not None else "length")


def test_speculative_decoding_stops_where_plain_decoding_does(tok, llm):
    """MTP accepts several tokens per step; the stop must still fall on the token that completes it."""
    prompt = [tok.bos_id] + tok.encode("the engine reads")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = free.text
    stops = [text[len(text) // 2: len(text) // 2 + 2]]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stops)
    spec = LLM(llm.model, tokenizer=tok, max_model_len=256, speculative="mtp", num_speculative_tokens=3)
    got = spec.generate([prompt], sp)[0]
    kept, cut = reference(tok, free.token_ids, stops)
    assert cut is not None and spec.spec_stats["verify_steps"] > 0
    assert got.token_ids == free.token_ids[:kept] and got.text == text[:cut] and got.finish_reason == "stop"


def test_stop_strings_need_a_tokenizer(llm):
    bare = LLM(llm.model, max_model_len=64)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.add_request([1, 2, 3], SamplingParams(stop=["x"]))
