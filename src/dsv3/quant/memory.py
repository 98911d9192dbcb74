"""Weight memory of a model in bf16 versus the official FP8 layout (for ``dsv3 info``).

FP8 layout: every weight that ``hf_layout.quantizable`` names takes 1 byte per element plus one
fp32 scale per block; everything else stays bf16 (the router's selection bias fp32). Computed
from the config alone: the model is built on the meta device, so no memory is allocated.
"""

from __future__ import annotations

import math

import torch

from .. import fp8
from ..config import ModelConfig


def fp8_weight_bytes(config: ModelConfig, block: tuple[int, int] | None = None) -> dict:
    """``{bf16_bytes, fp8_bytes, saved_bytes, saved_fraction, fp8_params, block}`` for ``config``
    (including MTP layers; the MTP copies of embedding/head that checkpoints repeat are not counted)."""
    from ..hf_layout import fp8_block, hf_names, quantizable
    from ..model import Transformer
    if block is None:
        block = fp8_block(config)
    class _Shapes(Transformer):
        def init_weights(self, std=None):  # shapes only: random init on meta tensors is slow and pointless
            pass

    with torch.device("meta"):
        model = _Shapes(config)
    bf16 = fp8_total = quantized = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for hf, e in hf_names(name, tuple(t.shape), config):
            shape = tuple(t.shape[1:]) if e is not None else tuple(t.shape)
            n = math.prod(shape)
            high = 4 if hf.endswith("e_score_correction_bias") else 2
            bf16 += n * high
            if quantizable(hf):
                fp8_total += n + 4 * math.prod(fp8.scale_shape(shape, block))
                quantized += n
            else:
                fp8_total += n * high
    return {"block": list(block), "bf16_bytes": bf16, "fp8_bytes": fp8_total, "saved_bytes": bf16 - fp8_total,
            "saved_fraction": (bf16 - fp8_total) / bf16 if bf16 else 0.0, "fp8_params": quantized}


def format_weight_bytes(w: dict) -> str:
    """Two lines for ``dsv3 info``."""
    def gb(n: int) -> str:
        return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"
    return "\n".join([
        "weights:",
        f"  bf16         {gb(w['bf16_bytes'])}",
        f"  fp8          {gb(w['fp8_bytes'])}  ({w['fp8_params'] / 1e9:,.3f}B params in E4M3, {w['block'][0]}x"
        f"{w['block'][1]} fp32 scales; saves {gb(w['saved_bytes'])}, {100 * w['saved_fraction']:.1f}%)",
    ])
