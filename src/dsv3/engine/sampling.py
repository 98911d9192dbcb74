"""Token sampling for the batched engine.

Under continuous batching every row of a logits batch belongs to a different request, each with its
own :class:`SamplingParams` and its own random stream. The pipeline for one row is

    raw logits -> logit bias -> penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> draw

(vLLM's order: repetition, frequency and presence penalties on the raw logits, then temperature, then
the filters, each filter seeing the distribution the previous one left, renormalized.)

The logit transforms are vectorized over the batch (per-row parameters are broadcast as ``[B, 1]``
tensors); only the random draws loop over rows, because a request's seed must give the same tokens
whatever else shares its batch, so each seeded row draws its noise from its own ``torch.Generator``.

The distribution a row is drawn from (:func:`probs_after_processing`) is also what speculative
verification (:mod:`dsv3.engine.speculation`) tests draft tokens against.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch

# Below this temperature a row is treated as greedy: dividing by something this small would only turn
# float32 logits into inf/NaN while the distribution is already a point mass for any practical purpose.
GREEDY_TEMPERATURE = 1e-5

# The SamplingParams fields :func:`sample` need not read for a greedy row: greedy decoding ignores the
# temperature and the filters by definition, and the engine acts on the others itself (length, stops,
# the seed of the request's generator, the logits processors it runs before ``sample``). A greedy
# row whose every other field holds its default is a plain argmax (``SamplingParams.plain_argmax``,
# sample's shortcut). A new field is not in this set, so setting it turns the shortcut off rather
# than being ignored there.
ARGMAX_IGNORES = frozenset({"temperature", "top_k", "top_p", "min_p", "max_tokens", "stop", "stop_token_ids",
                            "ignore_eos", "seed", "logits_processors"})


@dataclass
class SamplingParams:
    """Per-request decoding parameters, with the OpenAI / vLLM meaning of every field.

    Attributes:
        temperature: softmax temperature, ``>= 0``. ``0`` (anything below ``GREEDY_TEMPERATURE``)
            means greedy decoding: argmax of the penalized logits, with top-k/top-p/min-p ignored.
            OpenAI caps it at 2; like vLLM we accept any non-negative value.
        top_k: keep the ``top_k`` most likely tokens; ``0`` or ``-1`` switches it off. Exactly ``k``
            tokens survive even when logits tie at the boundary (ties go to the lower token id).
        top_p: nucleus sampling, in ``(0, 1]``: keep the smallest set of most likely tokens whose
            cumulative probability is ``>= top_p`` (always at least one token). ``1`` is off.
        min_p: in ``[0, 1]``: drop tokens whose probability is below ``min_p * max_prob``. ``0`` is off.
        presence_penalty: OpenAI's, in ``[-2, 2]``: subtracted once from the logit of every token that
            has already been *generated* (prompt tokens do not count). Negative values encourage.
        frequency_penalty: OpenAI's, in ``[-2, 2]``: subtracted ``count`` times from the logit of a
            token generated ``count`` times so far (again output tokens only).
        repetition_penalty: HF / CTRL style, ``> 0``: for every token seen in the prompt *or* the
            output, positive logits are divided by it and negative ones multiplied by it, so ``> 1``
            always makes a seen token less likely. ``1`` is off.
        max_tokens: maximum number of tokens to generate, ``>= 1``.
        stop_token_ids: generation stops after emitting any of these ids (the id is kept in the output).
        stop: stop strings; the detokenizer truncates the text before the first match.
        ignore_eos: keep generating past the tokenizer's end-of-sequence token.
        seed: seeds this request's own generator, so the same seed gives the same tokens whatever the
            batch; ``None`` draws from the engine's global stream.
        logprobs: ``None``: no log-probabilities requested; ``0``: only the sampled token's; ``n > 0``:
            also the ``n`` most likely alternatives at every step (OpenAI caps this at 20; we do not).
        logits_processors: callables ``f(output_token_ids, logits) -> logits`` applied in order to
            this request's next-token logits ``[V]`` before penalties and sampling (e.g. a grammar's
            token mask: disallowed tokens set to ``-inf``). A request with processors is never given
            speculative drafts, since the drafts would skip the processors.
        logit_bias: OpenAI's: ``{token_id: bias}`` added to those tokens' logits before penalties
            and sampling (``-100`` all but bans a token, ``100`` all but forces it). Logprobs
            (``"raw"``) stay those of the model. Such requests get no speculative drafts.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    logits_processors: Sequence[Callable] = ()
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        # A lone string is a common slip for a one-element list; splitting it into characters would be
        # a silent disaster, so normalize both sequence fields to tuples.
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.logit_bias is not None:
            try:
                bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
            self.logit_bias = bias or None
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value is out of range."""
        # Comparisons are written so that NaN fails them too.
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if not isinstance(self.max_tokens, numbers.Integral) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, numbers.Integral) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs}")
        if self.seed is not None and not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or not math.isfinite(bias):
                raise ValueError(f"logit_bias needs token ids >= 0 and finite biases, got {tok}: {bias}")

    @property
    def greedy(self) -> bool:
        """Whether this request decodes by argmax (temperature 0)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """Whether any of the repetition, frequency or presence penalties is on (the one rule for it)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def plain_argmax(self) -> bool:
        """Greedy with every field outside :data:`ARGMAX_IGNORES` at its default: the next token is
        the argmax of the raw logits and nothing else is asked for."""
        return self.greedy and all(getattr(self, name) == default for name, default in _ARGMAX_DEFAULTS.items())


_ARGMAX_DEFAULTS = {f.name: f.default for f in fields(SamplingParams) if f.name not in ARGMAX_IGNORES}


def penalty_inputs(prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]], vocab_size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(output_token_counts [B, V] int32, prompt_mask [B, V] bool)`` from token lists.

    ``prompt_mask`` marks the tokens of the prompt *or* the output, the set the repetition penalty
    applies to. An engine keeps these tensors up to date incrementally; this is the from-scratch form.
    """
    batch = len(prompt_ids)
    counts = torch.zeros(batch, vocab_size, dtype=torch.int32, device=device)
    seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
    for row, (prompt, output) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if output:
            out = torch.as_tensor(list(output), dtype=torch.long, device=device)
            counts[row].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
            seen[row, out] = True
        if prompt:
            seen[row, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
    return counts, seen


def apply_penalties(logits: torch.Tensor, output_token_counts: torch.Tensor, prompt_mask: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Apply repetition, then frequency and presence penalties (vLLM's order) to a logits batch.

    Args:
        logits: ``[B, V]`` float; never modified in place.
        output_token_counts: ``[B, V]`` integer, how often each token was generated so far per request.
        prompt_mask: ``[B, V]`` bool, tokens seen in the prompt (or prompt and output: tokens with a
            non-zero output count are added to it here, so either convention works).
        presence, frequency, repetition: ``[B]`` per-request penalties (floats or tensors).

    Semantics:
        * repetition (HF / vLLM): over prompt and output tokens, ``l / r`` if ``l > 0`` else ``l * r``.
        * frequency / presence (OpenAI): over output tokens only,
          ``l -= frequency * count + presence * (count > 0)``.

    Returns:
        ``[B, V]`` penalized logits. When every penalty is neutral the input tensor itself is returned
        (a bitwise no-op); rows with neutral penalties are bitwise unchanged in any case.
    """
    device, dtype = logits.device, logits.dtype
    presence = torch.as_tensor(presence, dtype=dtype, device=device).reshape(-1, 1)  # [B, 1]
    frequency = torch.as_tensor(frequency, dtype=dtype, device=device).reshape(-1, 1)  # [B, 1]
    repetition = torch.as_tensor(repetition, dtype=dtype, device=device).reshape(-1, 1)  # [B, 1]
    use_rep = repetition != 1  # [B, 1]
    use_additive = (presence != 0) | (frequency != 0)  # [B, 1]
    # One host sync to keep the common no-penalty batch completely free.
    any_rep, any_add = (bool(x) for x in torch.stack([use_rep.any(), use_additive.any()]).tolist())
    if not (any_rep or any_add):
        return logits
    generated = output_token_counts > 0  # [B, V]
    out = logits
    if any_rep:
        seen = (prompt_mask | generated) & use_rep  # [B, V]
        # A penalty r > 1 has to lower the token's probability whatever the logit's sign: dividing a
        # negative logit would raise it, hence the split.
        penalized = torch.where(out > 0, out / repetition, out * repetition)
        out = torch.where(seen, penalized, out)
    if any_add:
        counts = output_token_counts.to(dtype)
        delta = frequency * counts + presence * generated.to(dtype)  # [B, V]
        # Rows with neutral presence/frequency get delta == 0 exactly, but where() keeps them bitwise
        # untouched even for -0.0 or inf logits.
        out = torch.where(use_additive, out - delta, out)
    return out


@dataclass
class SampleOutput:
    """What :func:`sample` returns for a batch of ``B`` rows.

    Attributes:
        token_ids: ``[B]`` int64, the chosen token of each row.
        logprobs: ``[B]`` float32, log-probability of that token under the model's own distribution
            (see :func:`sample`).
        top_logprobs: per row, ``None`` when the request did not ask for logprobs, else the
            ``params.logprobs`` most likely ``(token_id, logprob)`` pairs, most likely first
            (empty for ``logprobs=0``).
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


@dataclass
class _Processed:
    """Intermediate results of the logit pipeline shared by sampling, logprobs and speculative decoding."""

    penalized: torch.Tensor  # [B, V] logits after penalties (what greedy rows take the argmax of)
    filtered: torch.Tensor  # [B, V] after temperature and top-k/top-p/min-p, -inf where dropped
    greedy: torch.Tensor  # [B] bool


def _row_tensor(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _process(logits: torch.Tensor, params: Sequence[SamplingParams], output_token_counts: torch.Tensor | None,
             prompt_mask: torch.Tensor | None) -> _Processed:
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits must be [B, V] with B == len(params) == {len(params)}, got {tuple(logits.shape)}")
    logits = logits.float()
    batch, vocab = logits.shape
    device = logits.device
    if any(p.logit_bias for p in params):
        logits = apply_logit_bias(logits, params)       # on the raw logits, before penalties (as vLLM)

    if any(p.uses_penalties for p in params):
        if output_token_counts is None or prompt_mask is None:
            raise ValueError("a request uses penalties: pass output_token_counts and prompt_mask")
        penalized = apply_penalties(
            logits, output_token_counts, prompt_mask,
            _row_tensor([p.presence_penalty for p in params], device, torch.float32),
            _row_tensor([p.frequency_penalty for p in params], device, torch.float32),
            _row_tensor([p.repetition_penalty for p in params], device, torch.float32))
    else:
        penalized = logits

    greedy_list = [p.greedy for p in params]
    greedy = _row_tensor(greedy_list, device, torch.bool)
    if any(not g and p.temperature != 1.0 for p, g in zip(params, greedy_list)):
        # Greedy rows get temperature 1 so the shared division stays finite; their filtered logits
        # are never used for the draw.
        temperature = _row_tensor([1.0 if g else p.temperature for p, g in zip(params, greedy_list)],
                                  device, torch.float32).unsqueeze(1)  # [B, 1]
        scaled = penalized / temperature
    else:
        scaled = penalized

    sampled_rows = [p for p, g in zip(params, greedy_list) if not g]
    use_top_k = any(0 < p.top_k < vocab for p in sampled_rows)
    use_top_p = any(p.top_p < 1 for p in sampled_rows)
    use_min_p = any(p.min_p > 0 for p in sampled_rows)
    if not (use_top_k or use_top_p or use_min_p):
        return _Processed(penalized, scaled, greedy)

    # All three filters are decided on the descending sort of the scaled logits. A stable sort makes
    # ties resolve to the lower token id, so the kept set is deterministic.
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [B, V] in sorted order
    rank = torch.arange(vocab, device=device).unsqueeze(0)  # [1, V]
    if use_top_k:
        top_k = _row_tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device, torch.long)
        drop |= rank >= top_k.unsqueeze(1)
    if use_top_p:
        top_p = _row_tensor([p.top_p for p in params], device, torch.float32).unsqueeze(1)  # [B, 1]
        # Nucleus over what top-k left, renormalized: softmax of the masked logits does both.
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Probability mass strictly before each position; a token is needed while that mass is still
        # short of top_p. Position 0 has mass 0 < top_p, so at least one token always survives.
        # (Shifted rather than cumsum - probs, which would add a round-off of its own.)
        mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
        # Rows with top_p == 1 are skipped outright: float round-off can push the running sum to
        # 1.0000001 and would otherwise drop genuine tail tokens.
        drop |= (mass_before >= top_p) & (top_p < 1)
    if use_min_p:
        min_p = _row_tensor([p.min_p for p in params], device, torch.float32).unsqueeze(1)  # [B, 1]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # The threshold is relative to the most likely token, so renormalization cannot move it; the
        # top token itself always passes because min_p <= 1.
        drop |= probs < min_p * probs[:, :1]
    drop &= ~greedy.unsqueeze(1)  # greedy rows ignore the filters (and this avoids a mask-index sync)
    drop_vocab = torch.empty_like(drop).scatter_(1, sorted_ids, drop)  # back to token-id order
    return _Processed(penalized, scaled.masked_fill(drop_vocab, float("-inf")), greedy)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``logits`` ``[B, V]`` plus each row's ``logit_bias`` (a new tensor; rows without a bias unchanged)."""
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for tok, bias in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(tok)
            values.append(bias)
    if not rows:
        return logits
    if max(cols) >= logits.shape[-1]:
        raise ValueError(f"logit_bias names token {max(cols)}, but the vocabulary has {logits.shape[-1]} ids")
    idx = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(idx, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def _final_probs(proc: _Processed) -> torch.Tensor:
    probs = proc.filtered.softmax(dim=-1)  # [B, V]
    if bool(proc.greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(1, proc.penalized.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(proc.greedy.unsqueeze(1), one_hot, probs)
    return probs


def probs_after_processing(logits: torch.Tensor, params: Sequence[SamplingParams],
                           output_token_counts: torch.Tensor | None = None,
                           prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution :func:`sample` draws from: ``[B, V]`` float32, rows summing to 1.

    Greedy rows are a one-hot at the argmax of the penalized logits, which is what makes speculative
    rejection sampling reduce to greedy verification at temperature 0.
    """
    return _final_probs(_process(logits, params, output_token_counts, prompt_mask))


def _exponential_noise(shape_like: torch.Tensor, generators: Sequence[torch.Generator | None],
                       rows: list[int]) -> torch.Tensor:
    """Exp(1) noise ``[B, V]`` where each listed row comes from its own generator (others are 1)."""
    noise = torch.ones_like(shape_like)
    unseeded = []
    for row in rows:
        gen = generators[row]
        if gen is None:
            unseeded.append(row)
        else:
            # Drawn row by row: the stream a seeded request sees must not depend on its neighbours.
            noise[row].exponential_(generator=gen)
    if unseeded:
        idx = torch.tensor(unseeded, device=noise.device)
        noise[idx] = torch.empty(len(unseeded), noise.shape[1], device=noise.device).exponential_()
    # exponential_ may round to exactly 0; a zero-probability token would then score 0/0 = NaN and
    # argmax could pick it. With a floor the ratio stays 0 for such tokens and finite for the rest.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _top_logprobs(logprobs: torch.Tensor, params: Sequence[SamplingParams]) -> list[list[tuple[int, float]] | None]:
    want = [p.logprobs for p in params]
    k_max = max((k for k in want if k), default=0)
    if k_max == 0:
        return [None if k is None else [] for k in want]
    values, ids = logprobs.topk(min(k_max, logprobs.shape[1]), dim=-1)  # sorted descending
    values, ids = values.tolist(), ids.tolist()
    return [None if k is None else list(zip(ids[row][:k], values[row][:k])) for row, k in enumerate(want)]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           output_token_counts: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> SampleOutput:
    """Pick one token per row of a batch whose rows belong to different requests.

    Args:
        logits: ``[B, V]`` next-token logits (computed in float32).
        params: one :class:`SamplingParams` per row.
        generators: one per row, on the logits' device; ``None`` rows use the global torch stream.
            Only sampled rows advance their generator (by exactly ``V`` exponential draws); greedy rows
            leave it untouched.
        output_token_counts, prompt_mask: ``[B, V]`` inputs of :func:`apply_penalties`; needed only
            when some row uses a penalty.

    Log-probabilities are those of the model's own distribution, ``log_softmax(logits)``, before
    logit bias, penalties, temperature and filters (vLLM's and OpenAI's "raw" logprobs).

    The draw is the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d.: the winner is token
    ``i`` with probability exactly ``p_i``, and the noise for a seeded row comes only from its own
    generator, so a seed reproduces its tokens whatever the rest of the batch is.
    """
    if len(generators) != len(params):
        raise ValueError(f"need one generator (or None) per row: {len(generators)} != {len(params)}")
    if all(p.plain_argmax for p in params):
        # Plain greedy rows: the argmax is the answer, no softmax or sort over the vocabulary.
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"logits must be [B, V] with B == len(params) == {len(params)}, got {tuple(logits.shape)}")
        logits = logits.float()
        token_ids = logits.argmax(dim=-1)
        chosen = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)
        return SampleOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=[None] * len(params))
    proc = _process(logits, params, output_token_counts, prompt_mask)
    probs = _final_probs(proc)  # [B, V]

    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        noise = _exponential_noise(probs, generators, sampled_rows)
        token_ids = (probs / noise).argmax(dim=-1)  # [B]; greedy rows: noise 1, one-hot probs -> argmax
    else:
        token_ids = proc.penalized.argmax(dim=-1)

    logprob_table = logits.float().log_softmax(dim=-1)
    chosen = logprob_table.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    return SampleOutput(token_ids=token_ids, logprobs=chosen, top_logprobs=_top_logprobs(logprob_table, params))
