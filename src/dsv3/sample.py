"""Minimal autoregressive sampling over the latent cache (one sequence).

Used by the trainer to show what a model learned. The inference engine (batching, paged cache,
speculative decoding) is the tool for real serving.
"""

from __future__ import annotations

import torch

from .model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Sample up to ``max_new_tokens`` after ``prompt``; greedy when ``temperature == 0``."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, cache=cache, absorb=True)[0, -1]
    pos, out = len(prompt), []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            scaled = logits / temperature
            if top_k:
                kth = scaled.topk(min(top_k, scaled.numel())).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            nxt = int(torch.multinomial(scaled.softmax(-1), 1, generator=g))
        out.append(nxt)
        if nxt in stop_ids:
            break
        logits = model(torch.tensor([[nxt]], device=device), start_pos=pos, cache=cache, absorb=True)[0, -1]
        pos += 1
    model.train(was_training)
    return out
