"""``dsv3 experiment quant``: what each decode precision costs in quality, against fp32 on one checkpoint.

For every precision (fp32, bf16, weight-only int8 / int4, with or without the ``lm_head``
quantized) the same checkpoint is loaded and measured on held-out text (default: the ``val`` split of
the stdlib corpus the pre-training demo never trains on):

- perplexity, exactly as ``dsv3 eval`` computes it (:func:`dsv3.eval.perplexity.perplexity`: the same
  seeded windows for every precision), and its change against fp32;
- teacher-forced agreement with fp32 on those windows: the fraction of positions whose top-1 token
  is fp32's, and the mean KL divergence KL(p_fp32 || p) of the next-token distributions (nats);
- greedy agreement in the engine: ``prompts`` held-out prompts of ``prompt_len`` tokens decoded
  greedily for ``gen_len`` tokens by ``dsv3.LLM``; the fraction of sequences identical to fp32's,
  and the mean length of the common prefix as a fraction of ``gen_len`` (after the first differing
  token two greedy continuations go their own ways, so later positions say little).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..quant.weight_only import DEFAULT_GROUP_SIZE, quantize_weight_only, weight_bytes


@dataclass(frozen=True)
class Precision:
    """One arm of the comparison: model ``dtype``, optional weight-only ``quantize``, ``head`` quantized too."""

    name: str
    dtype: str = "float32"
    quantize: str | None = None
    head: bool = False


PRECISIONS = {p.name: p for p in (
    Precision("fp32"), Precision("bf16", "bfloat16"),
    Precision("int8", quantize="int8"), Precision("int8+head", quantize="int8", head=True),
    Precision("int4", quantize="int4"), Precision("int4+head", quantize="int4", head=True),
)}
DEFAULT_PRECISIONS = tuple(PRECISIONS)


def load_at(model_dir: str | Path, p: Precision, group_size: int = DEFAULT_GROUP_SIZE):
    """The checkpoint as ``Transformer`` at precision ``p`` (quantized from its fp32 weights)."""
    from ..checkpoint import load_pretrained
    model = load_pretrained(model_dir, dtype=p.dtype)
    if p.quantize is not None:
        quantize_weight_only(model, p.quantize, group_size=group_size, head=p.head)
    return model.eval()


def _windows(tokens: np.ndarray, seq_len: int, max_windows: int, seed: int) -> np.ndarray:
    """The windows :func:`dsv3.eval.perplexity.perplexity` scores for the same arguments: [W, seq_len + 1]."""
    import random
    total = (len(tokens) - 1) // seq_len
    starts = list(range(0, total * seq_len, seq_len))
    if total > max_windows:
        starts = sorted(random.Random(seed).sample(starts, max_windows))
    return np.stack([tokens[s:s + seq_len + 1] for s in starts])


@torch.no_grad()
def _logits(model, rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [model(rows[i:i + batch_size]).float() for i in range(0, len(rows), batch_size)]


def _greedy(model, prompts: list[list[int]], gen_len: int) -> list[list[int]]:
    from ..engine import LLM, SamplingParams
    llm = LLM(model, max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + gen_len + 1, prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def quality_report(model_dir: str | Path, precisions=DEFAULT_PRECISIONS, data=None, seq_len: int = 256,
                   max_windows: int = 32, prompts: int = 16, prompt_len: int = 32, gen_len: int = 32,
                   group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0, batch_size: int = 8,
                   max_text_tokens: int = 2_000_000, log=print) -> dict:
    """Measure every precision in ``precisions`` (names of :data:`PRECISIONS`) against fp32; a JSON-ready dict."""
    from ..cpu import cpu_features
    from .perplexity import heldout_tokens, perplexity
    from ..tokenizer import Tokenizer

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    names = ["fp32"] + [p for p in precisions if p != "fp32"]
    tokenizer = Tokenizer.load(model_dir)
    tokens = heldout_tokens(tokenizer, data, max_tokens=max_text_tokens)
    rows = torch.from_numpy(_windows(tokens, seq_len, max_windows, seed))
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if prompts > len(rows):
        raise ValueError(f"--prompts {prompts}: only {len(rows)} held-out windows")
    if prompt_len + gen_len > seq_len + 1:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} must be <= seq_len + 1 = {seq_len + 1}")
    greedy_prompts = [r[:prompt_len].tolist() for r in rows[:prompts]]

    ref_logits = ref_tokens = None
    results = []
    for name in names:
        p = PRECISIONS[name]
        t0 = time.perf_counter()
        model = load_at(model_dir, p, group_size)
        ppl = perplexity(model, tokens, seq_len, max_windows, batch_size, seed)
        logits = _logits(model, inputs, batch_size)
        gen = _greedy(model, greedy_prompts, gen_len)
        r = {"precision": name, "dtype": p.dtype, "quantize": p.quantize, "head_quantized": p.head,
             "group_size": group_size if p.quantize == "int4" else None, "weight_bytes": weight_bytes(model),
             "ppl": ppl["ppl"], "loss": ppl["loss"]}
        if ref_logits is None:
            ref_logits, ref_tokens, ref_ppl = logits, gen, ppl
        else:
            agree = kl = n = 0.0
            for a, b in zip(ref_logits, logits):
                agree += float((a.argmax(-1) == b.argmax(-1)).sum())
                kl += float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
                n += a.shape[0] * a.shape[1]
            prefix = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), gen_len) for s, t in zip(ref_tokens, gen)]
            r.update({
                "ppl_change_vs_fp32": r["ppl"] / ref_ppl["ppl"] - 1,
                "top1_agreement": agree / n, "kl_vs_fp32": kl / n,
                "greedy_identical_sequences": sum(x == gen_len for x in prefix) / len(prefix),
                "greedy_common_prefix": float(np.mean(prefix)) / gen_len,
            })
        r["seconds"] = time.perf_counter() - t0
        log(format_row(r))
        results.append(r)
        del model, logits
    return {"experiment": "quant", "model": str(model_dir), "cpu": cpu_features(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "seq_len": seq_len,
            "windows": int(len(rows)), "scored_tokens": int(targets.numel()), "prompts": prompts,
            "prompt_len": prompt_len, "gen_len": gen_len, "seed": seed, "results": results}


HEADER = (f"{'precision':<10} {'weights MB':>10} {'ppl':>8} {'vs fp32':>8} {'top-1 agree':>11} {'KL nats':>9} "
          f"{'greedy same':>11} {'common prefix':>13}")


def format_row(r: dict) -> str:
    if "ppl_change_vs_fp32" not in r:
        return f"{r['precision']:<10} {r['weight_bytes'] / 1e6:>10.2f} {r['ppl']:>8.3f} {'-':>8} {'-':>11} {'-':>9} {'-':>11} {'-':>13}"
    return (f"{r['precision']:<10} {r['weight_bytes'] / 1e6:>10.2f} {r['ppl']:>8.3f} {100 * r['ppl_change_vs_fp32']:>+7.2f}% "
            f"{100 * r['top1_agreement']:>10.2f}% {r['kl_vs_fp32']:>9.5f} {100 * r['greedy_identical_sequences']:>10.1f}% "
            f"{100 * r['greedy_common_prefix']:>12.1f}%")


def format_report(report: dict) -> str:
    c = report["cpu"]
    lines = [f"quant quality: {report['model']}, {report['windows']} windows x {report['seq_len']} held-out tokens, "
             f"{report['prompts']} greedy prompts of {report['prompt_len']} + {report['gen_len']} tokens, seed "
             f"{report['seed']}; {c['model']} ({c['torch_cpu_capability']}), torch {report['torch']}, {report['date']}",
             HEADER] + [format_row(r) for r in report["results"]]
    return "\n".join(lines)
