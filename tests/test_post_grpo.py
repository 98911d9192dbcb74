"""GRPO: advantages, clipped objective and k3 KL against hand-computed cases; the engine samples the
current weights; a few seeded steps raise the mean reward; exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from post_fixtures import tiny_chat_model

from dsv3.checkpoint import load_pretrained
from dsv3.post.grpo import (GRPOConfig, group_advantages, grpo, grpo_objective, k3_kl, rollout,
                            sequence_logprobs)
from dsv3.sample import generate

EPS = 1e-4


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    a = group_advantages(r, EPS)
    # group 1: mean 0.5, std 0.5; group 2: no spread -> 0; group 3: mean 1, std sqrt(0.5)
    assert a[0].tolist() == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS)] * 1 + [-0.5 / (0.5 + EPS),
                                          0.5 / (0.5 + EPS)])
    assert a[1].tolist() == [0.0] * 4
    s = math.sqrt(0.5) + EPS
    assert a[2].tolist() == pytest.approx([1 / s, -1 / s, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3, 1))


def test_k3_is_unbiased_for_the_kl():
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    exact = float((pi * (pi.log() - ref.log())).sum())
    # E_{x~pi}[k3(x)] = KL(pi || ref) exactly, and every k3 value is >= 0
    k3 = k3_kl(pi.log(), ref.log())
    assert (k3 >= 0).all() and float((pi * k3).sum()) == pytest.approx(exact, rel=1e-12)
    assert float(k3_kl(torch.tensor(0.3), torch.tensor(0.3))) == 0.0


def _hand_case():
    half = math.log(0.5)
    old = torch.full((2, 3), half, dtype=torch.float64)
    # ratios: seq 0 -> 1.5 (clipped, A > 0), 0.9; seq 1 -> 0.5 (clipped, A < 0), 1.1; masked slots are junk
    logp = old + torch.tensor([[1.5, 0.9, 40.0], [1e-9, 0.5, 1.1]], dtype=torch.float64).log()
    # ref - logp: 0, ln 2 | -, -ln 2, 0
    ref = logp + torch.tensor([[0.0, math.log(2), 7.0], [9.0, -math.log(2), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logp.requires_grad_(True), old, ref, adv, mask


def test_clipped_objective_hand_computed():
    logp, old, ref, adv, mask = _hand_case()
    loss, stats = grpo_objective(logp, old, ref, adv, mask, clip_eps=0.2, kl_beta=0.1)
    # seq 0: [min(1.5, 1.2) - 0, 0.9 - 0.1 (1 - ln 2)]; seq 1: [min(-0.5, -0.8) - 0.1 (ln 2 - 0.5), -1.1 - 0]
    # J = mean over sequences of the per-sequence token means = (2.1 - 1.9 - 0.05) / 4 = 0.0375
    assert float(loss.detach()) == pytest.approx(-0.0375, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 4)
    assert stats["kl"] == pytest.approx((1 - math.log(2) + math.log(2) - 0.5) / 4)
    loss.backward()
    g = logp.grad
    # clipped tokens pass no policy gradient; seq 0 t0 also has d = 0 so no KL gradient either
    assert float(g[0, 0]) == 0.0
    # seq 1 t1: only the KL term, beta * (1 - e^d) / (2 * 2) with e^d = 0.5
    assert float(g[1, 1]) == pytest.approx(0.1 * 0.5 / 4)
    # seq 0 t1 (unclipped): -(ratio * A - beta * (1 - e^d)) / 4 = -(0.9 + 0.1) / 4
    assert float(g[0, 1]) == pytest.approx(-0.25)
    assert float(g[0, 2]) == 0.0 and float(g[1, 0]) == 0.0          # masked positions


def test_inner_ratio_one_is_plain_policy_gradient():
    logp, old, ref, adv, mask = _hand_case()
    same = logp.detach().clone().requires_grad_(True)
    loss, stats = grpo_objective(same, same.detach(), same.detach(), adv, mask, 0.2, 0.04)
    assert stats["clip_frac"] == 0 and stats["kl"] == 0
    loss.backward()
    # d(-J)/dlogp = -A / (|o_i| * G)
    assert same.grad[0, :2].tolist() == pytest.approx([-0.25, -0.25])
    assert same.grad[1, 1:].tolist() == pytest.approx([0.25, 0.25])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("grpo") / "model")


def test_engine_samples_the_updated_weights(chat_model):
    path, tok = chat_model
    model = load_pretrained(path, dtype="float32").train()
    prompt = tok.render_chat([{"role": "user", "content": "What is 2 + 3?"}], thinking=True)
    for round_ in range(2):
        got = rollout(model, tok, [prompt], group_size=2, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
        want = generate(model, prompt, 6, temperature=0.0, stop_ids=(tok.eos_id,))
        assert got[0][0][:len(want)] == want and got[0][1] == got[0][0]
        assert model.training                                   # the rollout gives train mode back
        with torch.no_grad():                                   # an "update": greedy tokens must follow it
            model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.5)
    # log-probs of the training forward equal a float64 recomputation
    toks = torch.tensor([prompt + got[0][0]])
    lp = sequence_logprobs(model, toks)
    ref = model.double()(toks[:, :-1]).double().log_softmax(-1).gather(-1, toks[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp.double(), ref, atol=1e-5)


ASCII_TASK = """
prompts = ["What is 2 + 3?", "Sort: 3 1 2", "Balanced? ()"]
def reward(prompt, completion):
    return float(completion[:1].isascii() and completion != "")
"""


def expected_reward(path, tok) -> float:
    """The exact mean over the task's prompts of P(first completion token starts with an ASCII char)."""
    model = load_pretrained(path)
    good = torch.tensor([float(tok.decode([i])[:1].isascii() and tok.decode([i]) != "") for i in range(tok.vocab_size)])
    total = 0.0
    for q in ["What is 2 + 3?", "Sort: 3 1 2", "Balanced? ()"]:
        ids = tok.render_chat([{"role": "user", "content": q}], thinking=True)
        with torch.no_grad():
            total += float((model(torch.tensor([ids]))[0, -1].softmax(-1) * good).sum())
    return total / 3


def test_a_few_grpo_steps_raise_the_mean_reward(tmp_path):
    # a peaked head (few likely tokens, like a trained model) so a handful of samples covers them
    path, tok = tiny_chat_model(tmp_path / "model", seed=1, head_scale=40.0)
    task = tmp_path / "ascii_first.py"
    task.write_text(ASCII_TASK)
    cfg = GRPOConfig(model=str(path), task=str(task), out=str(tmp_path / "run"), max_steps=4, prompts_per_step=2,
                     group_size=8, max_new_tokens=2, lr=3e-3, kl_beta=0.04, seed=0, save_every=0,
                     eval_problems=0, progress=False)
    s = grpo(cfg, log=lambda *a: None)
    rewards = [json.loads(ln)["reward_mean"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 4 and s["reward_last"] == rewards[-1]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards
    before, after = expected_reward(path, tok), expected_reward(tmp_path / "run" / "final", tok)
    assert before < 0.6 and after > before + 0.3, (before, after)
    assert (tmp_path / "run" / "plots" / "reward.png").is_file()


def test_grpo_resume_is_exact(chat_model, tmp_path):
    path, _ = chat_model
    base = dict(model=str(path), task="arithmetic", max_steps=2, prompts_per_step=2, group_size=3, max_new_tokens=5,
                lr=1e-3, seed=3, save_every=1, eval_problems=0, progress=False)
    grpo(GRPOConfig(out=str(tmp_path / "a"), **base), log=lambda *a: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")          # interrupted after checkpoint-1
    shutil.rmtree(tmp_path / "b" / "final")
    grpo(GRPOConfig(out=str(tmp_path / "b")), resume=True, log=lambda *a: None)

    def losses(d):
        return [(r["reward_mean"], r["loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text()
                                                             .splitlines())]
    assert losses("a") == losses("b")
    wa = load_pretrained(tmp_path / "a" / "final").state_dict()
    wb = load_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
