"""Passkey retrieval (dsv3.eval.passkey): prompt construction (exact length, the needle at the requested
depth in tokens, seeded keys), the cached scoring against a plain full forward and the sampler, the
sweep's result and plot, and ``dsv3 eval --passkey``."""

import json
import re

import pytest
import torch

import dsv3
from conftest import CHAT_TEXT, far_from_ties_, tiny_config
from dsv3.eval.passkey import (FILLER, INTRO, NEEDLE, QUESTION, build_prompt, build_prompts, fixed_overhead,
                               passkey_eval, plot_passkey, score_prompt)
from dsv3.sample import generate
from dsv3.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    # The prompt's own words plus unrelated text, so filler units are a handful of tokens, not bytes.
    return train_tokenizer([CHAT_TEXT, (INTRO + FILLER * 5 + NEEDLE.format(key="12345") + QUESTION) * 3],
                           vocab_size=600)


@pytest.fixture(scope="module")
def model(tok, one_thread):
    torch.manual_seed(0)
    return far_from_ties_(dsv3.Transformer(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512))).eval()


@pytest.mark.parametrize("length", [120, 257, 400])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
def test_prompt_length_and_needle_depth(tok, length, depth):
    p = build_prompt(tok, length, depth, "48213")
    assert len(p.ids) == length  # exact: the filler takes what intro, needle and question leave
    needle = tok.encode(NEEDLE.format(key="48213"))
    assert p.ids[p.needle_start:p.needle_start + len(needle)] == needle
    assert "48213" in tok.decode(p.ids[p.needle_start:p.needle_start + p.needle_len])
    head = 1 + len(tok.encode(INTRO))
    unit = len(tok.encode(FILLER))
    n_fill = length - head - len(needle) - len(tok.encode(QUESTION))
    assert p.filler_tokens == n_fill
    # the needle sits at a filler-unit boundary within half a unit of depth x filler tokens
    assert p.needle_start - head == p.filler_before
    assert abs(p.filler_before - depth * n_fill) <= unit / 2 + 1e-9
    assert p.filler_before % unit == 0 or p.filler_before == n_fill
    # depth 0: right after the intro; depth 1: right before the question
    if depth == 0.0:
        assert p.needle_start == head
    if depth == 1.0:
        q = tok.encode(QUESTION)
        assert p.ids[-len(q):] == q and p.ids[-len(q) - len(needle):-len(q)] == needle
    assert p.ids[0] == tok.bos_id
    assert tok.decode(p.ids).rstrip().endswith("The pass key is")


def test_needle_moves_with_depth(tok):
    starts = [build_prompt(tok, 600, d, "11111").needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5
    actual = [build_prompt(tok, 600, d, "11111").depth_actual for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert max(abs(a - d) for a, d in zip(actual, (0.0, 0.25, 0.5, 0.75, 1.0))) < 0.05


def test_prompts_are_seeded(tok):
    a = build_prompts(tok, 300, 0.5, trials=4, seed=3, candidates=10)
    b = build_prompts(tok, 300, 0.5, trials=4, seed=3, candidates=10)
    c = build_prompts(tok, 300, 0.5, trials=4, seed=4, candidates=10)
    assert [(p.ids, d) for p, d in a] == [(p.ids, d) for p, d in b]
    assert [p.key for p, _ in a] != [p.key for p, _ in c]
    for p, dis in a:
        assert re.fullmatch(r"[1-9]\d{4}", p.key)
        assert len(dis) == 9 and len(set(dis)) == 9 and p.key not in dis
        assert all(re.fullmatch(r"[1-9]\d{4}", d) for d in dis)
    assert len({p.key for p, _ in a}) > 1  # trials differ
    # a prompt depends only on its own coordinates: another sweep keeps it
    assert build_prompts(tok, 300, 0.5, trials=2, seed=3)[1][0].ids == a[1][0].ids


def test_bad_requests(tok):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        build_prompt(tok, fixed_overhead(tok) - 5, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        build_prompt(tok, 300, 1.5, "12345")
    with pytest.raises(ValueError, match="need at least"):
        passkey_eval(torch.nn.Identity(), tok, [fixed_overhead(tok)])


def test_scoring_matches_plain_forward_and_sampler(tok, model):
    """The cached scores equal a full forward over prompt + answer (no cache), and the greedy answer
    equals dsv3.sample.generate's."""
    p, dis = build_prompts(tok, 200, 0.5, trials=1, seed=0, candidates=4)[0]
    got = score_prompt(model, tok, p, dis, max_new_tokens=6)
    with torch.no_grad():
        ref = {}
        for cand in [p.key, *dis]:
            ans = tok.encode(" " + cand)
            logits = model(torch.tensor([p.ids + ans]))[0].float()          # [L + a, V]
            lp = torch.log_softmax(logits[len(p.ids) - 1:-1], -1)
            ref[cand] = float(lp.gather(-1, torch.tensor(ans)[:, None]).sum())
    assert got["key_logprob"] == pytest.approx(ref[p.key], abs=1e-3)
    assert got["rank"] == 1 + sum(v > ref[p.key] for c, v in ref.items() if c != p.key)
    gen = generate(model, p.ids, 6, temperature=0.0, stop_ids=(tok.eos_id,))
    assert got["completion"] == tok.decode(gen, skip_special_tokens=True)
    assert got["correct"] == (got["answer"] == p.key)


def test_sweep_result_and_plot(tok, model, tmp_path):
    r = passkey_eval(model, tok, [150, 220], depths=[0.0, 1.0], trials=2, seed=1, candidates=5)
    assert r["lengths"] == [150, 220] and r["depths"] == [0.0, 1.0]
    assert len(r["grid"]) == 2 and all(len(row) == 2 for row in r["grid"])
    for row in r["grid"]:
        for c in row:
            assert 0 <= c["accuracy"] <= 1 and 1 <= c["mean_rank"] <= 5 and c["trials"] == 2
    assert r["chance_rank"] == 3
    again = passkey_eval(model, tok, [150, 220], depths=[0.0, 1.0], trials=2, seed=1, candidates=5)
    assert again["grid"] == r["grid"]  # seeded and deterministic
    png = plot_passkey(r, tmp_path / "pk.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(r)  # JSON-ready


def test_cli_passkey(tok, model, tmp_path):
    from dsv3.cli import main
    d = tmp_path / "m"
    dsv3.save_pretrained(model, d)
    tok.save(d)
    out = tmp_path / "pk.json"
    assert main(["eval", "--model", str(d), "--passkey", "--lengths", "150,200", "--depths", "0,0.5",
                 "--trials", "1", "--candidates", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["passkey"]
    assert r["lengths"] == [150, 200] and r["candidates"] == 3 and "perplexity" not in json.loads(out.read_text())
    assert (tmp_path / "pk.png").exists() and r["plot"] == str(tmp_path / "pk.png")
