"""Sampling and speculative verification: parameters, filters, penalties, seeds, logprobs, statistics.

The statistical tests use a fixed seed, so they are deterministic; each also runs a deliberately
broken variant through the same chi-square check and asserts that it fails, so a check that could
never fire would show up here.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.engine.sampling import (
    ARGMAX_IGNORES,
    SamplingParams,
    apply_penalties,
    penalty_inputs,
    probs_after_processing,
    sample,
)
from dsv3.engine.speculation import greedy_verify, rejection_sample

P_VALUE_FLOOR = 1e-3


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of ``counts`` [V] to ``probs`` [V]; returns the p-value.

    A bin with zero expected probability but a non-zero count is an impossible outcome: p = 0.
    """
    counts, probs = counts.double(), probs.double() / probs.sum()
    total = counts.sum()
    support = probs > 0
    if bool((counts[~support] > 0).any()):
        return 0.0
    expected = total * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    # Survival function of chi2(dof) = regularized upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def histogram(tokens, vocab: int) -> torch.Tensor:
    return torch.bincount(torch.as_tensor(tokens, dtype=torch.long), minlength=vocab)


# --------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("field_name, value", [
    ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01),
    ("min_p", -0.1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("max_tokens", 0),
    ("top_k", -2),
    ("logprobs", -1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
])
def test_params_validation_names_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens) == (1.0, 0, 1.0, 0.0, 16)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    # Edge values that are allowed.
    SamplingParams(top_k=-1, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=0)
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    # validate() re-checks after a mutation.
    p.top_p = 0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()


# --------------------------------------------------------------------------------------------------
# Greedy, top-k, top-p, min-p, temperature


def test_greedy_is_argmax_and_ignores_filters():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.9) for _ in range(5)]
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    states = [g.get_state() for g in gens]
    out = sample(logits, params, gens)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    # Greedy rows must not consume their request's random stream.
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))
    probs = probs_after_processing(logits, params)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 40).float())


def test_top_k_only_the_k_best_ever_appear():
    torch.manual_seed(1)
    vocab, k, n = 30, 4, 3000
    row = torch.randn(vocab)
    params = [SamplingParams(temperature=1.5, top_k=k)] * n
    gen = torch.Generator().manual_seed(0)
    out = sample(row.expand(n, vocab), params, [gen] * n)
    assert set(out.token_ids.tolist()) == set(row.topk(k).indices.tolist())
    # Exactly k candidates even when the boundary ties: the lower ids win.
    flat = torch.zeros(1, 10)
    probs = probs_after_processing(flat, [SamplingParams(top_k=3)])
    assert torch.equal(probs[0].nonzero().flatten(), torch.tensor([0, 1, 2]))
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    # top_k >= V and top_k in {0, -1} keep everything.
    for top_k in (0, -1, 10, 50):
        assert int((probs_after_processing(flat, [SamplingParams(top_k=top_k)]) > 0).sum()) == 10


def test_top_p_boundaries_and_ties():
    torch.manual_seed(2)
    logits = torch.randn(3, 25)
    tiny = probs_after_processing(logits, [SamplingParams(top_p=1e-6)] * 3)
    assert torch.equal(tiny, torch.nn.functional.one_hot(logits.argmax(-1), 25).float())
    # Four equal tokens (probability exactly 0.25 each): the smallest set reaching top_p.
    flat = torch.zeros(1, 4)
    for top_p, kept in [(0.25, 1), (0.26, 2), (0.5, 2), (0.6, 3), (0.75, 3), (0.9, 4), (1.0, 4)]:
        probs = probs_after_processing(flat, [SamplingParams(top_p=top_p)])
        assert torch.equal(probs[0].nonzero().flatten(), torch.arange(kept)), top_p
        assert torch.allclose(probs[0, :kept], torch.full((kept,), 1 / kept))
    # Away from ties: p = [.5, .3, .15, .05]; top_p .79 keeps 2, .81 keeps 3.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert int((probs_after_processing(logits, [SamplingParams(top_p=0.79)]) > 0).sum()) == 2
    assert int((probs_after_processing(logits, [SamplingParams(top_p=0.81)]) > 0).sum()) == 3
    # top_p composes with top_k on the renormalized top-k distribution: with top_k=2 the two survivors
    # have .625/.375, so top_p=.6 keeps only the first.
    assert int((probs_after_processing(logits, [SamplingParams(top_k=2, top_p=0.6)]) > 0).sum()) == 1


def test_min_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = probs_after_processing(logits, [SamplingParams(min_p=0.2)])  # threshold 0.1
    assert torch.allclose(probs[0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert int((probs_after_processing(logits, [SamplingParams(min_p=1.0)]) > 0).sum()) == 1
    assert int((probs_after_processing(logits, [SamplingParams(min_p=0.0)]) > 0).sum()) == 4


def test_low_temperature_is_nearly_greedy_and_high_flattens():
    torch.manual_seed(3)
    n, vocab = 500, 20
    row = torch.randn(vocab)
    row[7] = row.max() + 0.5  # a clear winner: at T=0.01 the runner-up has odds e^-50
    gen = torch.Generator().manual_seed(0)
    out = sample(row.expand(n, vocab), [SamplingParams(temperature=0.01)] * n, [gen] * n)
    assert set(out.token_ids.tolist()) == {7}
    probs = probs_after_processing(row[None], [SamplingParams(temperature=100.0)])
    assert float(probs.max() - probs.min()) < 0.01


# --------------------------------------------------------------------------------------------------
# Penalties


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0],
                           [2.0, -1.0, 0.5, 3.0],
                           [2.0, -1.0, 0.5, 3.0]])
    counts = torch.tensor([[2, 1, 0, 0], [2, 1, 0, 0], [0, 1, 0, 0]])
    prompt = torch.tensor([[False, False, True, False], [False, False, True, False], [True, False, False, False]])
    out = apply_penalties(logits, counts, prompt, presence=[0.5, 0.0, 0.0], frequency=[0.25, 0.0, 0.0],
                          repetition=[2.0, 1.0, 0.5])
    # Row 0: repetition over prompt+output {0, 1, 2}: 2 -> 1, -1 -> -2, 0.5 -> 0.25 (3 untouched);
    # then output tokens only: id 0 (count 2): 1 - (0.25*2 + 0.5) = 0; id 1 (count 1): -2 - 0.75;
    # id 2 was only in the prompt, so presence/frequency leave it alone.
    assert torch.equal(out[0], torch.tensor([0.0, -2.75, 0.25, 3.0]))
    assert torch.equal(out[1], logits[1])  # neutral row, bitwise
    # Row 2: r = 0.5 < 1 rewards repeats: 2 / 0.5 = 4 (prompt), -1 * 0.5 = -0.5 (output).
    assert torch.equal(out[2], torch.tensor([4.0, -0.5, 0.5, 3.0]))
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0]))  # input not modified
    # Negative presence penalty encourages.
    enc = apply_penalties(logits[:1], counts[:1], prompt[:1], [-1.0], [0.0], [1.0])
    assert torch.equal(enc, torch.tensor([[3.0, 0.0, 0.5, 3.0]]))


def test_neutral_penalties_are_bitwise_noop():
    torch.manual_seed(4)
    logits = torch.randn(4, 64) * 10
    logits[0, 3] = float("-inf")
    logits[1, 5] = -0.0
    counts = torch.randint(0, 3, (4, 64))
    seen = torch.rand(4, 64) > 0.5
    out = apply_penalties(logits, counts, seen, [0.0] * 4, [0.0] * 4, [1.0] * 4)
    assert out is logits
    # Neutral rows stay bitwise identical next to a penalized row.
    mixed = apply_penalties(logits, counts, seen, [0.0, 0.0, 1.0, 0.0], [0.0] * 4, [1.0, 1.0, 1.0, 1.3])
    for row in (0, 1):
        assert torch.equal(mixed[row], logits[row])
        assert torch.equal(mixed[row].view(torch.int32), logits[row].view(torch.int32))


def test_penalties_through_sample_and_penalty_inputs():
    counts, seen = penalty_inputs([[0, 1], [2]], [[3, 3, 1], []], vocab_size=5)
    assert counts.tolist() == [[0, 1, 0, 2, 0], [0, 0, 0, 0, 0]]
    assert seen.tolist() == [[True, True, False, True, False], [False, False, True, False, False]]
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0, 4.0], [0.0, 0.0, 9.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=2.0), SamplingParams(temperature=0, repetition_penalty=2.0)]
    with pytest.raises(ValueError, match="output_token_counts"):
        sample(logits, params, [None, None])
    # Row 0: token 3 goes 5 - 2*2 = 1, so greedy picks 4. Row 1: prompt token 2 goes 9 -> 4.5, still the max.
    out = sample(logits, params, [None, None], output_token_counts=counts, prompt_mask=seen)
    assert out.token_ids.tolist() == [4, 2]


# --------------------------------------------------------------------------------------------------
# Per-request seeds


def _stream(seed: int, row_logits: list[torch.Tensor], position: int, others: list[tuple[SamplingParams, int | None]],
            params: SamplingParams) -> list[int]:
    """Tokens for one request over several steps, placed at ``position`` among other requests."""
    gen = torch.Generator().manual_seed(seed)
    other_gens = [None if s is None else torch.Generator().manual_seed(s) for _, s in others]
    tokens = []
    for step, logits in enumerate(row_logits):
        noise = torch.randn(len(others), logits.numel(), generator=torch.Generator().manual_seed(1000 + step))
        batch = list(noise.unbind(0))
        batch.insert(position, logits)
        all_params = [p for p, _ in others]
        all_params.insert(position, params)
        gens = list(other_gens)
        gens.insert(position, gen)
        out = sample(torch.stack(batch), all_params, gens)
        tokens.append(int(out.token_ids[position]))
    return tokens


def test_same_seed_same_tokens_in_any_batch():
    torch.manual_seed(5)
    steps = [torch.randn(50) for _ in range(12)]
    mine = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    alone = _stream(1234, steps, 0, [], mine)
    batch_a = _stream(1234, steps, 0, [(SamplingParams(seed=7), 7), (SamplingParams(), None)], mine)
    batch_b = _stream(1234, steps, 2, [(SamplingParams(temperature=0), None), (SamplingParams(top_k=2), 99),
                                       (SamplingParams(min_p=0.3), 5)], mine)
    assert alone == batch_a == batch_b
    other_seed = _stream(4321, steps, 0, [], mine)
    assert other_seed != alone


# --------------------------------------------------------------------------------------------------
# Logprobs


def test_raw_logprobs_and_top_logprobs():
    torch.manual_seed(6)
    logits = torch.randn(3, 30) * 3
    params = [SamplingParams(temperature=0.7, top_k=5, logprobs=4), SamplingParams(logprobs=0), SamplingParams()]
    out = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(3)])
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == raw[0].topk(4).indices.tolist()
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert torch.allclose(torch.tensor([v for _, v in top]), raw[0].topk(4).values)
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] is None


def test_processed_distribution_is_what_is_sampled():
    """The distribution after processing (what the draws and speculative verification use): top-k
    leaves k tokens, renormalized from the tempered logits; a greedy row is the one-hot of its argmax."""
    torch.manual_seed(7)
    logits = torch.randn(2, 30) * 3
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=5), SamplingParams(temperature=0, logprobs=2)]
    out = sample(logits, params, [torch.Generator().manual_seed(0), None])
    processed = probs_after_processing(logits, params).log()
    top3 = logits[0].topk(3).indices
    kept = torch.isfinite(processed[0]).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(top3.tolist())
    assert torch.allclose(processed[0, top3], (logits[0, top3] / 0.5).log_softmax(-1))
    assert int(out.token_ids[0]) in top3.tolist()
    ranked = processed[0].sort(descending=True).values
    assert all(math.isinf(v) for v in ranked[3:5].tolist())        # beyond the 3 survivors: -inf
    assert processed[1].exp().tolist() == torch.nn.functional.one_hot(logits[1].argmax(), 30).float().tolist()
    assert int(out.token_ids[1]) == int(logits[1].argmax())


# A value other than the default for every SamplingParams field (a new field must be added here).
NON_DEFAULT = {"temperature": 0.5, "top_k": 2, "top_p": 0.5, "min_p": 0.5, "presence_penalty": 2.0,
               "frequency_penalty": 2.0, "repetition_penalty": 3.0, "max_tokens": 3, "stop_token_ids": (1,),
               "stop": ("x",), "ignore_eos": True, "seed": 3, "logprobs": 2,
               "logits_processors": (lambda ids, logits: logits,), "logit_bias": {0: 50.0}}


def test_greedy_shortcut_ignores_no_field_it_should_not():
    """sample()'s shortcut (a plain argmax for greedy rows) is taken only when every field it does not
    read holds its default: each field outside ARGMAX_IGNORES switches it off, and each field inside
    really leaves the full pipeline's greedy distribution at the raw argmax."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(NON_DEFAULT) == names, f"give NON_DEFAULT a value for {names ^ set(NON_DEFAULT)}"
    assert ARGMAX_IGNORES <= names
    logits = torch.linspace(0, 3, 12)[torch.randperm(12, generator=torch.Generator().manual_seed(8))][None]
    assert logits[0].argmax() != 0                          # so the bias on token 0 moves the argmax
    counts = torch.zeros(1, 12, dtype=torch.int32)
    counts[0, logits[0].argmax()] = 3                       # the favourite was generated: penalties bite
    seen = counts > 0
    raw_argmax = int(logits[0].argmax())
    assert SamplingParams(temperature=0).plain_argmax
    for name, value in NON_DEFAULT.items():
        if name == "temperature":                           # a greedy row is one with temperature 0
            continue
        p = SamplingParams(**{"temperature": 0, name: value})
        out = sample(logits, [p], [None], counts, seen)
        reference = probs_after_processing(logits, [p], counts, seen)[0]          # the full pipeline, no shortcut
        assert int(out.token_ids[0]) == int(reference.argmax()), name
        if name in ARGMAX_IGNORES:
            assert p.plain_argmax and int(reference.argmax()) == raw_argmax, name
        else:
            assert not p.plain_argmax, f"the greedy shortcut would ignore {name}"
            if name == "logprobs":
                assert len(out.top_logprobs[0]) == 2
            else:                                            # bias and penalties move the argmax here
                assert int(out.token_ids[0]) != raw_argmax, name


# --------------------------------------------------------------------------------------------------
# Statistics: the sampler draws from exactly the distribution it claims


P6 = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def _draw_many(params: SamplingParams, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = sample(P6.log().expand(n, 6), [params] * n, [gen] * n)
    return histogram(out.token_ids, 6)


def _biased_inverse_cdf(probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The classic bug: filtered probabilities that were never renormalized, fed to an inverse CDF.

    Uniform draws beyond the filtered mass fall off the end and get clamped to the last kept token.
    """
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    idx = (probs.double().cumsum(-1)[None] < u).sum(-1).clamp(max=int(probs.nonzero().max()))
    return histogram(idx, probs.numel())


def test_sampler_matches_known_distribution_chi_square():
    n = 30_000
    counts = _draw_many(SamplingParams(), n, seed=0)
    assert chi2_pvalue(counts, P6) > P_VALUE_FLOOR
    # The test has teeth: a sampler that skips one token's worth of mass, or one that draws with the
    # wrong noise (argmax(p / U) instead of argmax(p / Exp(1))), fails the same check.
    assert chi2_pvalue(counts, torch.tensor([0.36, 0.25, 0.14, 0.12, 0.08, 0.05])) < P_VALUE_FLOOR
    u = torch.rand(n, 6, generator=torch.Generator().manual_seed(0))
    wrong_noise = histogram((P6 / u).argmax(-1), 6)
    assert chi2_pvalue(wrong_noise, P6) < P_VALUE_FLOOR


def test_filtered_sampler_matches_renormalized_distribution_chi_square():
    n = 30_000
    # top_k=5 drops 0.05; renormalized [.368 .263 .158 .126 .084] has cumulative mass .789 before id 3,
    # so top_p=0.7 keeps ids {0, 1, 2}.
    params = SamplingParams(top_k=5, top_p=0.7)
    expected = torch.tensor([0.35, 0.25, 0.15, 0.0, 0.0, 0.0])
    assert torch.allclose(probs_after_processing(P6.log()[None], [params])[0], expected / expected.sum())
    counts = _draw_many(params, n, seed=1)
    assert chi2_pvalue(counts, expected) > P_VALUE_FLOOR
    # Broken variants fail: an off-by-one top-k (k+1 survivors) and a missing renormalization.
    off_by_one = _draw_many(SamplingParams(top_k=4), n, seed=1)
    assert chi2_pvalue(off_by_one, torch.tensor([0.35, 0.25, 0.15, 0.12, 0, 0])) > P_VALUE_FLOOR
    assert chi2_pvalue(off_by_one, expected) < P_VALUE_FLOOR
    not_renormalized = _biased_inverse_cdf(expected, n, seed=1)
    assert chi2_pvalue(not_renormalized, expected) < P_VALUE_FLOOR
    # min_p=0.3 (threshold .105) keeps {0, 1, 2, 3}.
    counts = _draw_many(SamplingParams(min_p=0.3, temperature=1.0), n, seed=2)
    assert chi2_pvalue(counts, torch.tensor([0.35, 0.25, 0.15, 0.12, 0, 0])) > P_VALUE_FLOOR


# --------------------------------------------------------------------------------------------------
# Speculative decoding

P_TARGET = torch.tensor([[0.10, 0.40, 0.20, 0.25, 0.05],
                         [0.30, 0.05, 0.05, 0.20, 0.40],
                         [0.20, 0.20, 0.20, 0.20, 0.20]])  # [k+1, V], last row for the bonus token
Q_DRAFT = torch.tensor([[0.45, 0.05, 0.30, 0.00, 0.20],
                        [0.05, 0.50, 0.25, 0.15, 0.05]])  # [k, V]; q=0 for a token p wants 25% of


def _draft_tokens(n: int, seed: int) -> torch.Tensor:
    """``[n, k]`` draft tokens, position i drawn from ``Q_DRAFT[i]`` independently."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.multinomial(Q_DRAFT[i], n, replacement=True, generator=gen)
                        for i in range(Q_DRAFT.shape[0])], dim=1)


def _first_token_always_accept(n: int, seed: int) -> torch.Tensor:
    """Wrong verifier: keep every draft. Its first emitted token is just the first draft (vectorized)."""
    return _draft_tokens(n, seed)[:, 0]


def _first_token_resample_from_target(n: int, seed: int) -> torch.Tensor:
    """Wrong verifier: correct accept test, but a rejection redraws from p instead of max(0, p - q)."""
    x = _draft_tokens(n, seed)[:, 0]
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(n, generator=gen)
    accept = u * Q_DRAFT[0, x] < P_TARGET[0, x]
    return torch.where(accept, x, torch.multinomial(P_TARGET[0], n, replacement=True, generator=gen))


def _run_trials(n: int, seed: int) -> list[list[int]]:
    drafts = _draft_tokens(n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return [rejection_sample(drafts[t], Q_DRAFT, P_TARGET, gen) for t in range(n)]


def test_rejection_sampling_preserves_target_distribution():
    n = 20_000
    outs = _run_trials(n, seed=0)
    assert all(1 <= len(o) <= 3 for o in outs)
    # Position j of the output exists only when drafts 0..j-1 were accepted; given that, with drafts
    # drawn independently per position, it must be distributed as the target's p_j.
    for j in range(3):
        tokens = [o[j] for o in outs if len(o) > j]
        assert len(tokens) > 1000
        assert chi2_pvalue(histogram(tokens, 5), P_TARGET[j]) > P_VALUE_FLOOR, j
    # Acceptance of the first draft is sum_x min(p, q) = 0.40.
    accepted = sum(len(o) > 1 for o in outs) / n
    assert abs(accepted - 0.40) < 0.02
    # Broken verifiers fail the same first-token test: always accepting emits q_0 (p-value ~ 0), and
    # redrawing rejections from p emits min(p, q) + 0.6 p = [.16 .29 .32 .15 .08] instead of p.
    for wrong in (_first_token_always_accept, _first_token_resample_from_target):
        first = wrong(n, seed=0)
        assert chi2_pvalue(histogram(first, 5), P_TARGET[0]) < P_VALUE_FLOOR, wrong.__name__


def test_rejection_sampling_edge_cases():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    # q(x) = 0 while p(x) > 0: always accepted (ratio +inf).
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(50):
        assert rejection_sample([1], q, p, gen)[0] == 1
    # p(x) = 0: always rejected, and the replacement comes from the residual, never x itself.
    q = torch.tensor([[0.0, 0.0, 1.0]])
    for _ in range(50):
        out = rejection_sample([2], q, p, gen)
        assert len(out) == 1 and out[0] in (0, 1)
    # q(x) = 0 and p(x) = 0 (an inconsistent draft): never accept a token the target rules out.
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(50):
        assert rejection_sample([2], q, p, gen) == [1]  # residual max(0, p - q) = [0, .5, 0]
    # p == q: every draft accepted, plus a bonus token.
    for _ in range(50):
        assert len(rejection_sample([0], p[:1], p, gen)) == 2
    # A draft row summing to 2 makes the residual all zeros on rejection: fall back to p.
    seen = set()
    for _ in range(200):
        out = rejection_sample([0], 2 * p[:1], p, gen)
        seen.add(out[0])
        assert out[0] in (0, 1)
    assert seen == {0, 1}
    # k = 0: just one token from the target.
    assert rejection_sample([], torch.zeros(0, 3), p[:1], gen)[0] in (0, 1)
    with pytest.raises(ValueError, match="k\\+1"):
        rejection_sample([0, 1], torch.zeros(2, 3), p[:1], gen)


def test_rejection_sampling_with_greedy_target_equals_greedy_verify():
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        logits = torch.randn(4, 7)
        target = probs_after_processing(logits, [SamplingParams(temperature=0)] * 4)
        drafts = logits.argmax(-1)[:3].clone()
        drafts[torch.randint(0, 4, ()).item():] = torch.randint(0, 7, (1,))  # maybe corrupt a suffix
        one_hot_q = torch.nn.functional.one_hot(drafts, 7).float()
        assert rejection_sample(drafts, one_hot_q, target, gen) == greedy_verify(drafts, logits)


def test_greedy_verify():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 5.0],
                           [5.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 5.0, 0.0]])  # argmax per position: 1, 3, 0, 2
    assert greedy_verify([1, 3, 0], logits) == [1, 3, 0, 2]  # all accepted: k + 1 tokens
    assert greedy_verify(torch.tensor([1, 2, 0]), logits) == [1, 3]  # mismatch at 1 -> target's token
    assert greedy_verify([0, 3, 0], logits) == [1]
    assert greedy_verify([], logits[:1]) == [1]
    with pytest.raises(ValueError):
        greedy_verify([1], logits)
