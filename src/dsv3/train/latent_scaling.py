"""Fan-in scaling of ``kv_b_proj`` when the MLA latent is wider than the model needs.

The deployment engines' MLA kernels (vLLM, SGLang, FlashMLA) take only the V2/V3 latent,
``kv_lora_rank`` 512 (+ 64 rope), so the presets users train keep it even at hidden size 256, where
the latent compresses nothing. DeepSeek's latents are at most a quarter of the hidden size
(V2-Lite 512 / 2048, V3 512 / 7168). ``kv_b_proj`` reads the normalized latent (RMS 1), so with one
init std its output grows as sqrt(r), and an AdamW step (the same size per element) moves it by ~r:
at r = 512 on the 256-wide tiny preset both are 8x what a hidden/4 = 64-wide latent sees, and the
demo's validation loss after 200 steps was 5.60 nats instead of 5.19 (2026-12-03, benchmarks/RESULTS.md).

The fix is muP's rule for a hidden matrix of larger fan-in, taken relative to a latent of hidden/4:
with ``s = min(1, (hidden_size // 4) / kv_lora_rank)``, ``kv_b_proj`` starts at ``sqrt(s)`` times the
init std and trains at ``s`` times the learning rate. That brought the demo back to 5.64 nats at 100
steps (the 64-wide latent: 5.65). For V3 and V2-Lite s = 1 (nothing changes); ``small`` (768 wide)
gets s = 0.375.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def latent_scale(config: ModelConfig) -> float:
    """``s = min(1, (hidden_size // 4) / kv_lora_rank)``: 1 unless the latent is wider than hidden/4."""
    return min(1.0, (config.hidden_size // 4) / config.kv_lora_rank)


def latent_projections(model: nn.Module) -> list[nn.Parameter]:
    """The ``kv_b_proj`` weights of every attention (decoder layers and MTP modules), in model order."""
    return [m.weight for name, m in model.named_modules() if name.endswith("kv_b_proj")]


@torch.no_grad()
def scale_latent_init(model: nn.Module, scale: float) -> None:
    """Multiply the freshly initialized ``kv_b_proj`` weights by ``sqrt(scale)`` (their std follows)."""
    if scale != 1.0:
        for w in latent_projections(model):
            w.mul_(math.sqrt(scale))
