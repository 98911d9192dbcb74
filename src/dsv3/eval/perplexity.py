"""Perplexity on held-out text.

Documents are laid out as in pre-training (each document's tokens then EOS, concatenated) and cut
into non-overlapping windows of ``seq_len + 1`` tokens; every window contributes ``seq_len``
next-token predictions. With more windows than ``max_windows``, a seeded random subset is scored,
so the same seed gives the same number. Default text: the held-out (``val``) split of the pre-training
demo corpus -- the standard library sources whose hashed id falls in the validation fraction, which
``dsv3 train`` never trains on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_VAL_FRACTION = 0.02   # the pre-training default (TrainConfig.val_fraction)


def heldout_tokens(tokenizer, paths: Sequence[str] | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                   max_tokens: int | None = None) -> np.ndarray:
    """The token stream of the held-out text: all documents of ``paths``, or (``paths=None``) the
    ``val`` split of the standard-library corpus. Stops after ``max_tokens`` tokens when given."""
    from ..data import iter_documents, split_of
    docs = iter_documents(paths)
    if paths is None:
        docs = (d for d in docs if split_of(d.doc_id, val_fraction) == "val")
    out, n = [], 0
    for doc in docs:
        ids = tokenizer.encode(doc.text) + [tokenizer.eos_id]
        out.append(np.asarray(ids, dtype=np.int64))
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    if not out:
        raise ValueError("no held-out text to evaluate on")
    stream = np.concatenate(out)
    return stream[:max_tokens] if max_tokens is not None else stream


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int = 256, max_windows: int | None = 64, batch_size: int = 8,
               seed: int = 0) -> dict:
    """Mean next-token loss (nats) and perplexity of ``model`` over windows of ``tokens``.

    Returns ``{"loss", "ppl", "tokens", "windows", "total_windows", "seq_len", "seed"}``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    total = (len(tokens) - 1) // seq_len
    if total < 1:
        raise ValueError(f"only {len(tokens)} held-out tokens: fewer than one window of {seq_len + 1}")
    starts = list(range(0, total * seq_len, seq_len))
    if max_windows is not None and total > max_windows:
        starts = sorted(random.Random(seed).sample(starts, max_windows))
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]])
        w = torch.from_numpy(rows).to(device)
        logits = model(w[:, :-1])
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count, "windows": len(starts),
            "total_windows": total, "seq_len": seq_len, "seed": seed}
