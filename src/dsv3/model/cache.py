"""A contiguous latent KV cache: per layer, normalized ``c_kv`` and rotated ``k_pe`` for every position.

This is the model-level cache used for step-by-step decoding and tests; the inference engine keeps the
same two tensors in fixed-size pages instead. Per token and layer it holds
``kv_lora_rank + qk_rope_head_dim`` values (576 for V3), never per-head keys or values.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """``c_kv [B, max_len, kv_lora_rank]`` and ``k_pe [B, max_len, qk_rope_head_dim]`` per layer."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        n = config.num_hidden_layers if num_layers is None else num_layers
        self.max_len = max_len
        self.c_kv = [torch.zeros(batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device) for _ in range(n)]
        self.k_pe = [torch.zeros(batch_size, max_len, config.qk_rope_head_dim, dtype=dtype, device=device)
                     for _ in range(n)]

    def update(self, layer: int, start: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions ``[start, start+S)`` and return everything up to ``start+S``."""
        end = start + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; asked to write up to {end}")
        self.c_kv[layer][:, start:end] = c_kv
        self.k_pe[layer][:, start:end] = k_pe
        return self.c_kv[layer][:, :end], self.k_pe[layer][:, :end]

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe, start_pos: int, absorb: bool) -> torch.Tensor:
        """Store this layer's new latents at ``start_pos``, then attend over everything cached so far."""
        c_kv, k_pe = self.update(mla.layer_idx, start_pos, c_kv, k_pe)
        return mla.attend(q_nope, q_pe, c_kv, k_pe, absorb)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.c_kv + self.k_pe)
