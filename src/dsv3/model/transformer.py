"""The DeepSeek-V3 (and V2) causal language model on a single device.

    embed_tokens -> Block x num_hidden_layers -> norm -> lm_head       (main logits)
                                      \\-> MTPModule x num_nextn_predict_layers -> norm -> lm_head

Parallelism, compilation, FP8 and kernels are applied to this module from outside; it stays the
plain reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .cache import LatentCache
from .moe import MoE, Router
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor                    # [B, S, V] float
    mtp_logits: list[torch.Tensor]          # depth k: [B, S-k, V]; position i predicts token i+k+1
    hidden: torch.Tensor                    # [B, S, D] final normed hidden state


class Transformer(nn.Module):
    """DeepSeek-V3. ``model(input_ids)`` returns float logits ``[batch, seq, vocab]``."""

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i, max_seq_len=max_seq_len) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(c, k + 1, max_seq_len) for k in range(c.num_nextn_predict_layers))
        self.rope = RotaryEmbedding(c, max_seq_len)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) matrices, unit norms, zero biases and router bias."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, MoE):
                for p in m.experts.parameters():
                    nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None,
                absorb: bool = False, return_mtp: bool = False,
                positions: torch.Tensor | None = None) -> torch.Tensor | ModelOutput:
        """input_ids [B, S] at positions ``start_pos..`` -> logits [B, S, V] (float).

        ``cache``: a :class:`LatentCache` (or the engine's paged cache) to read/write while decoding.
        ``absorb``: use absorbed MLA. ``return_mtp``: return a :class:`ModelOutput` with the per-depth
        MTP logits too. ``positions`` [S] or [B, S]: explicit token positions (the engine's packed batches).
        """
        h, cos, sin = self.hidden_states(input_ids, start_pos, cache, absorb, positions)
        logits = self.lm_head(h).float()
        if not return_mtp:
            return logits
        return ModelOutput(logits, self.mtp_forward(input_ids, h, cos, sin), h)

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0, cache=None, absorb: bool = False,
                      positions: torch.Tensor | None = None):
        """The final normed hidden states [B, S, D] (and the RoPE tables used), without the head."""
        S = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + S, device=input_ids.device)
        cos, sin = self.rope(positions)                                    # [(B,) S, rope/2]
        for layer in self.layers:
            h = layer(h, cos, sin, cache, start_pos, absorb)
        return self.norm(h), cos, sin

    def mtp_states(self, input_ids: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, cache=None,
                   absorb: bool = False) -> torch.Tensor:
        """The first MTP module at explicit positions over a cache (speculative drafting): tokens
        ``input_ids [B, S]`` are t_{i+1}, ``h [B, S, D]`` the matching h_i, ``positions [S]`` the i
        -> the module's hidden states ``[B, S, D]`` (before its norm)."""
        cos, sin = self.rope(positions)
        return self.mtp[0](h, self.embed_tokens(input_ids), cos, sin, cache=cache, absorb=absorb)

    def mtp_forward(self, input_ids: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """Training-time MTP over a whole sequence: depth k's logits at position i predict token i+k+1."""
        return [self.lm_head(hk).float() for hk in self.mtp_hidden_states(input_ids, h, cos, sin)]

    def mtp_hidden_states(self, input_ids: torch.Tensor, h: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> list[torch.Tensor]:
        """Depth k's normed hidden states ``[B, S-k, D]`` (its logits without the head), k = 1..D."""
        out = []
        S = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if S - k <= 0:
                break
            emb = self.embed_tokens(input_ids[:, k:])                      # tokens i+k, i < S-k
            h = module(h[:, : S - k], emb, cos[: S - k], sin[: S - k])
            out.append(module.norm(h))
        return out

    # ------------------------------------------------------------------ helpers
    def moe_layers(self) -> list[MoE]:
        """The MoE layers of the main model, in order (their routers expose ``last_counts``)."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A contiguous latent cache for this model (main layers)."""
        p = self.embed_tokens.weight
        return LatentCache(self.config, batch_size, max_len, dtype=dtype or p.dtype, device=p.device)

    def num_params(self, include_mtp: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_mtp:
            n -= sum(p.numel() for p in self.mtp.parameters())
        return n
