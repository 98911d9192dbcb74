"""Multi-token prediction module (DeepSeek-V3 §2.2).

Depth k at position i combines the previous depth's hidden state with the embedding of token i+k:
    h' = eh_proj([enorm(emb(t_{i+k})) ; hnorm(h_i)])      (embedding first, as released engines do)
    h' = Block(h')                                          full MLA + MoE block
    logits = lm_head(shared_head.norm(h'))                  embedding and head shared with the model
Depth 1 takes the main model's final (normed) hidden state, as vLLM and SGLang feed it; depth k>1
takes depth k-1's block output.
"""

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, depth: int, max_seq_len: int | None = None):
        super().__init__()
        c = config
        layer_idx = c.num_hidden_layers + depth - 1     # its index in the checkpoint
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.block = Block(c, layer_idx, max_seq_len=max_seq_len)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # shared_head.norm

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None, start_pos: int = 0, absorb: bool = False) -> torch.Tensor:
        """h, emb [B,S,D] (emb of the token k ahead) -> this depth's hidden state [B,S,D] (before norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, cache, start_pos, absorb)
