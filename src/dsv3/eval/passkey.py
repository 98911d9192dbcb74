"""Passkey retrieval (``dsv3 eval --passkey``): can the model find a number hidden in a long context?

The task of Mohtashami & Jaggi (2023, "Landmark Attention"), used by YaRN and LongLoRA to check a
context extension: a random 5-digit key sits at a chosen *depth* of repeated filler text,

    [BOS] There is an important info hidden inside ... I will quiz you about the important information there.
    The grass is green. The sky is blue. ... The pass key is 48213. Remember it. 48213 is the pass key.
    The grass is green. ... What is the pass key? The pass key is

and the model has to continue with the key. The prompt is assembled from token pieces (intro,
filler units, needle, question), so its length is exactly the requested one and the needle starts
at a filler-unit boundary nearest to ``depth x filler tokens`` (0: right after the intro, 1: right
before the question).

Two scores per prompt:
- **greedy**: the first run of digits in the greedy continuation equals the key (the usual accuracy);
- **rank**: the log-probability of `` KEY`` against ``candidates - 1`` other random 5-digit numbers
  after the same prompt (teacher-forced, one prefill shared by all); rank 1 = the key is the most
  likely. A model that cannot retrieve scores chance, ``(candidates + 1) / 2`` on average; one that
  uses the context ranks the key higher before it can reproduce it, which is what a tiny model shows.

Results per (length, depth): accuracy, mean rank, rank-1 rate, mean key log-prob; JSON-ready, and a
heat map PNG (:func:`plot_passkey`). Everything is seeded: same seed, same prompts and keys.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PasskeyPrompt:
    """One prompt: ``ids`` (exactly ``length`` tokens), the key, and where the needle sits."""

    ids: list[int]
    key: str
    length: int
    depth: float            # requested, as a fraction of the filler tokens
    needle_start: int       # token index where the needle begins
    needle_len: int
    filler_tokens: int      # filler tokens in the prompt (before + after the needle)
    filler_before: int      # filler tokens before the needle

    @property
    def depth_actual(self) -> float:
        """Where the needle really went, as a fraction of the filler (boundary-snapped)."""
        return self.filler_before / self.filler_tokens if self.filler_tokens else 0.0


def sample_rng(seed: int, length: int, depth: float, trial: int) -> random.Random:
    """The generator of one prompt's key and distractors: a function of its coordinates only, so
    adding lengths or depths to a sweep leaves the other prompts unchanged."""
    return random.Random(f"passkey:{seed}:{length}:{depth:.6f}:{trial}")  # str seeds hash with SHA-512


def random_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def fixed_overhead(tokenizer, bos: bool = True, key: str = "12345") -> int:
    """Tokens of a prompt that are not filler (BOS, intro, needle, question): the shortest length."""
    return (1 if bos else 0) + len(tokenizer.encode(INTRO)) + len(tokenizer.encode(NEEDLE.format(key=key))) \
        + len(tokenizer.encode(QUESTION))


def build_prompt(tokenizer, length: int, depth: float, key: str, bos: bool = True) -> PasskeyPrompt:
    """The passkey prompt of ``length`` tokens with ``key`` at ``depth`` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth}: must be within [0, 1]")
    if not re.fullmatch(r"\d+", key):
        raise ValueError(f"passkey key {key!r}: must be digits")
    head = ([tokenizer.bos_id] if bos else []) + tokenizer.encode(INTRO)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    unit = tokenizer.encode(FILLER)
    n_fill = length - len(head) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"passkey length {length}: shorter than the prompt without filler "
                         f"({length - n_fill} tokens with this tokenizer)")
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    # the needle goes at the filler-unit boundary nearest to depth * n_fill (or at the very end)
    boundaries = list(range(0, n_fill + 1, len(unit))) + [n_fill]
    target = depth * n_fill
    before = min(boundaries, key=lambda b: (abs(b - target), b))
    ids = head + filler[:before] + needle + filler[before:] + question
    assert len(ids) == length
    return PasskeyPrompt(ids=ids, key=key, length=length, depth=depth, needle_start=len(head) + before,
                         needle_len=len(needle), filler_tokens=n_fill, filler_before=before)


def build_prompts(tokenizer, length: int, depth: float, trials: int, seed: int = 0, candidates: int = 10,
                  bos: bool = True) -> list[tuple[PasskeyPrompt, list[str]]]:
    """``trials`` prompts at one (length, depth), each with its ``candidates - 1`` distractor keys."""
    out = []
    for t in range(trials):
        rng = sample_rng(seed, length, depth, t)
        key = random_key(rng)
        distractors: list[str] = []
        while len(distractors) < candidates - 1:
            d = random_key(rng)
            if d != key and d not in distractors:
                distractors.append(d)
        out.append((build_prompt(tokenizer, length, depth, key, bos), distractors))
    return out


# ------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_prompt(model, tokenizer, prompt: PasskeyPrompt, distractors: Sequence[str],
                 max_new_tokens: int = 8) -> dict:
    """Greedy answer and key rank of one prompt: one prefill into a latent cache, then the greedy
    continuation and each candidate answer teacher-forced from that cache (they overwrite the same
    positions after the prompt, which no later read outlives)."""
    device = model.embed_tokens.weight.device
    answers = {c: tokenizer.encode(" " + c) for c in [prompt.key, *distractors]}
    longest = max(max_new_tokens, *(len(a) for a in answers.values()))
    L = len(prompt.ids)
    cache = model.new_cache(1, L + longest)
    ids = torch.tensor([prompt.ids], device=device)
    # prefill with the plain (SDPA, causal) path: no [L, L] score matrix, no per-position logits
    h, _, _ = model.hidden_states(ids, cache=cache, absorb=False)
    last = model.lm_head(h[:, -1]).float()[0]                         # [V]: the first answer token
    first_logp = torch.log_softmax(last, -1)

    gen, logits = [], last
    for pos in range(L, L + max_new_tokens):
        nxt = int(logits.argmax())
        gen.append(nxt)
        if nxt == tokenizer.eos_id:
            break
        logits = model(torch.tensor([[nxt]], device=device), start_pos=pos, cache=cache, absorb=True)[0, -1]
    text = tokenizer.decode(gen, skip_special_tokens=True)
    m = re.search(r"\d+", text)
    answer = m.group(0) if m else ""

    logps = {}
    for cand, toks in answers.items():
        lp = float(first_logp[toks[0]])
        if len(toks) > 1:
            lg = model(torch.tensor([toks[:-1]], device=device), start_pos=L, cache=cache, absorb=True)[0]
            lp += float(torch.log_softmax(lg.float(), -1).gather(-1, torch.tensor(toks[1:], device=device)[:, None]).sum())
        logps[cand] = lp
    key_lp = logps[prompt.key]
    rank = 1 + sum(1 for c, v in logps.items() if c != prompt.key and v > key_lp)
    return {"key": prompt.key, "answer": answer, "completion": text, "correct": answer == prompt.key,
            "rank": rank, "key_logprob": key_lp, "candidates": len(logps),
            "needle_start": prompt.needle_start, "depth_actual": prompt.depth_actual}


def passkey_eval(model, tokenizer, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
                 trials: int = 5, seed: int = 0, candidates: int = 10, max_new_tokens: int = 8,
                 bos: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Accuracy (greedy) and key rank per length x depth; ``result["grid"][i][j]`` is length i, depth j."""
    if not lengths:
        raise ValueError("passkey: give at least one length")
    if trials < 1:
        raise ValueError(f"passkey trials must be >= 1, got {trials}")
    if candidates < 2:
        raise ValueError(f"passkey candidates must be >= 2 (the key and a distractor), got {candidates}")
    shortest = fixed_overhead(tokenizer, bos) + len(tokenizer.encode(FILLER))
    too_short = [n for n in lengths if n < shortest]
    if too_short:
        raise ValueError(f"passkey lengths {too_short}: need at least {shortest} tokens with this tokenizer "
                         "(intro, one filler sentence group, needle, question)")
    was_training = model.training
    model.eval()
    grid, samples = [], []
    try:
        for n in lengths:
            row = []
            for d in depths:
                scores = [score_prompt(model, tokenizer, p, dis, max_new_tokens)
                          for p, dis in build_prompts(tokenizer, n, d, trials, seed, candidates, bos)]
                cell = {"length": n, "depth": d, "trials": trials,
                        "accuracy": sum(s["correct"] for s in scores) / trials,
                        "mean_rank": sum(s["rank"] for s in scores) / trials,
                        "rank1_rate": sum(s["rank"] == 1 for s in scores) / trials,
                        "mean_key_logprob": sum(s["key_logprob"] for s in scores) / trials,
                        "depth_actual": sum(s["depth_actual"] for s in scores) / trials}
                row.append(cell)
                samples.append({"length": n, "depth": d, **{k: scores[0][k] for k in ("key", "completion", "rank")}})
                if progress:
                    progress(f"passkey length {n} depth {d:g}: accuracy {cell['accuracy']:.2f}, mean rank "
                             f"{cell['mean_rank']:.2f} of {candidates}")
            grid.append(row)
    finally:
        model.train(was_training)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    by_length = [{"length": n, "accuracy": sum(c["accuracy"] for c in row) / len(row),
                  "mean_rank": sum(c["mean_rank"] for c in row) / len(row)} for n, row in zip(lengths, grid)]
    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
            "candidates": candidates, "chance_rank": (candidates + 1) / 2, "chance_accuracy": 0.0,
            "max_position_embeddings": max_pos,
            "beyond_max_position": [n for n in lengths if max_pos is not None and n > max_pos],
            "accuracy": sum(c["accuracy"] for row in grid for c in row) / (len(lengths) * len(depths)),
            "by_length": by_length, "grid": grid, "samples": samples}


# ------------------------------------------------------------------------------------- plot
def plot_passkey(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Two heat maps (depth x length): greedy accuracy and mean key rank (chance marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, depths = result["lengths"], result["depths"]
    acc = np.array([[c["accuracy"] for c in row] for row in result["grid"]]).T      # [depth, length]
    rank = np.array([[c["mean_rank"] for c in row] for row in result["grid"]]).T
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(lengths) * 2, 1.5 + 0.5 * len(depths)), squeeze=False)
    panels = ((acc, "greedy accuracy", 0.0, 1.0, "RdYlGn"),
              (rank, f"mean key rank of {result['candidates']} (chance {result['chance_rank']:g})",
               1.0, float(result["candidates"]), "RdYlGn_r"))
    for ax, (data, name, lo, hi, cmap) in zip(axes[0], panels):
        im = ax.imshow(data, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=9)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.2f}" if hi <= 1 else f"{data[i, j]:.1f}", ha="center", va="center",
                        fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_passkey(result: dict) -> str:
    """A text table: accuracy / mean rank per length (columns) and depth (rows)."""
    lengths = result["lengths"]
    lines = [f"passkey retrieval ({result['trials']} trials per cell, seed {result['seed']}; rank among "
             f"{result['candidates']} candidates, chance {result['chance_rank']:g})",
             "depth  " + "".join(f"{n:>14}" for n in lengths)]
    for j, d in enumerate(result["depths"]):
        cells = (result["grid"][i][j] for i in range(len(lengths)))
        lines.append(f"{d:<6g} " + "".join(f"{c['accuracy']:>7.2f} r{c['mean_rank']:<5.2f}" for c in cells))
    lines.append("all    " + "".join(f"{b['accuracy']:>7.2f} r{b['mean_rank']:<5.2f}" for b in result["by_length"]))
    if result["beyond_max_position"]:
        lines.append(f"note: lengths {result['beyond_max_position']} exceed the model's max_position_embeddings "
                     f"({result['max_position_embeddings']})")
    return "\n".join(lines)


__all__ = ["PasskeyPrompt", "build_prompt", "build_prompts", "score_prompt", "passkey_eval", "plot_passkey",
           "format_passkey", "fixed_overhead", "DEFAULT_DEPTHS"]
