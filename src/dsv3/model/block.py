"""One pre-norm residual block: ``h += attn(norm(h)); h += ffn(norm(h))`` with a dense MLP or MoE."""

import torch
from torch import nn

from ..config import ModelConfig
from .cache import LatentCache
from .mla import MLA
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, max_seq_len: int | None = None):
        super().__init__()
        c = config
        # layer_idx is also the cache slot it writes; MTP blocks come after the main layers.
        self.self_attn = MLA(c, layer_idx, max_seq_len)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c) if c.is_moe_layer(layer_idx) else MLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start_pos: int = 0, absorb: bool = False) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, start_pos, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))
