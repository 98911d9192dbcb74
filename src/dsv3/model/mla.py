"""Multi-head Latent Attention (DeepSeek-V2/V3), with its two execution paths.

Per token x (DESIGN.md §2):
  q        = q_b_proj(q_a_layernorm(q_a_proj(x)))  or  q_proj(x)          [H, nope + rope]
  c_kv,k_pe = kv_a_proj_with_mqa(x)                                        [r], [rope] (one head)
  c_kv     = kv_a_layernorm(c_kv);   k_pe, q_pe rotated by RoPE
  k_nope,v = kv_b_proj(c_kv)                                               [H, nope], [H, v]

naive:    materialize per-head K = [k_nope, k_pe] and V, then scaled-dot-product attention.
absorbed: fold W_UK into the query (q_lat = q_nope @ W_UK, [H, r]) and W_UV into the output, so
          attention runs directly over the cached latents (c_kv, k_pe); nothing per-head is stored.
Both give the same result; the cache only ever holds c_kv and k_pe.

Over a long cached context (the engine's prompt chunks), :meth:`MLA.attend_blocks` runs either path
one block of cached latents at a time with an online softmax (:mod:`dsv3.kernels.blocked_attention`):
the naive path decompresses per-head K/V for one block only, the absorbed path reads the latents
as they are. Which is cheaper depends on the number of queries (:meth:`MLA.absorbed_is_cheaper`):
per key, naive pays ``r * H * (nope + v)`` once to decompress plus ``H * (qk + v)`` per query, absorbed
``H * (2r + rope)`` per query; long chunks take the naive path, a few rows the absorbed one.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_get_mscale
from ..kernels.blocked_attention import blocked_attention
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, max_seq_len: int | None = None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim, self.rank = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        qk = c.qk_head_dim
        if c.uses_q_lora:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)

        self.softmax_scale = qk ** -0.5
        y = c.yarn
        if y is not None and c.yarn_active(max_seq_len) and y.get("mscale_all_dim"):
            m = yarn_get_mscale(float(y["factor"]), float(y["mscale_all_dim"]))
            self.softmax_scale *= m * m

    # -------------------------------------------------------------- projections
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,S,D] -> q_nope [B,S,H,nope], q_pe [B,S,H,rope], c_kv [B,S,r] (normalized), k_pe [B,S,rope] (rotated)."""
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q = q.view(B, S, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        return q_nope, q_pe, self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                start_pos: int = 0, absorb: bool = False) -> torch.Tensor:
        """x [B,S,D] at positions ``start_pos..start_pos+S-1`` -> [B,S,D].

        ``cache`` is anything with ``attend(mla, q_nope, q_pe, c_kv, k_pe, start_pos, absorb)``: the
        contiguous :class:`LatentCache` writes the new latents at ``start_pos`` and attends over all
        cached positions; the engine's paged cache does the same through block tables. ``absorb``
        picks the absorbed (latent) path.
        """
        B, S, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if cache is not None:
            out = cache.attend(self, q_nope, q_pe, c_kv, k_pe, start_pos, absorb)
        else:
            out = self.attend(q_nope, q_pe, c_kv, k_pe, absorb)
        return self.o_proj(out.reshape(B, S, self.n_heads * self.v_dim))

    def attend(self, q_nope, q_pe, c_kv, k_pe, absorb: bool = False) -> torch.Tensor:
        """Causal attention of S queries over T >= S latent positions, the queries being the last S.

        q_nope [B,S,H,nope], q_pe [B,S,H,rope], c_kv [B,T,r], k_pe [B,T,rope] -> [B,S,H,v].
        """
        S, T = q_nope.shape[1], c_kv.shape[1]
        # Causal over absolute positions: query i (at T-S+i) sees keys 0..T-S+i.
        mask = None
        if S > 1 or T != S:
            q_idx = torch.arange(T - S, T, device=c_kv.device)
            mask = torch.arange(T, device=c_kv.device)[None, :] <= q_idx[:, None]  # [S, T]
        if absorb:
            return self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask)
        return self._naive(q_nope, q_pe, c_kv, k_pe, mask)

    # -------------------------------------------------------------- the two paths
    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, S, H, _ = q_nope.shape
        T = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1)  # [B,T,H,qk]
        q = torch.cat([q_nope, q_pe], dim=-1)                                          # [B,S,H,qk]
        # SDPA wants [B,H,S,d]; it accepts a value head dim different from the query/key one.
        # Without a past, plain is_causal lets SDPA pick its flash/efficient kernels.
        causal = S == T and S > 1
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if causal else mask, is_causal=causal,
                                           scale=self.softmax_scale)
        return o.transpose(1, 2)  # [B,S,H,v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, nope, r]`` and ``W_UV [H, v, r]`` views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope:]

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """``q_nope [N, H, nope] -> q_nope @ W_UK  [N, H, r]``.

        A ``kv_b_proj`` stored for the absorbed products (weight-only int8: ``Int8AbsorbedProj``)
        multiplies by itself; a plain one is read through :meth:`absorbed_weights`' views."""
        if hasattr(self.kv_b_proj, "absorb_query"):
            return self.kv_b_proj.absorb_query(q_nope)
        w_uk, _ = self.absorbed_weights()                                         # [H, nope, r]
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """``o_lat [N, H, r] -> o_lat @ W_UV^T  [N, H, v]`` (the heads' values from the latent output)."""
        if hasattr(self.kv_b_proj, "absorb_output"):
            return self.kv_b_proj.absorb_output(o_lat)
        _, w_uv = self.absorbed_weights()                                         # [H, v, r]
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def absorbed_is_cheaper(self, num_queries: int, context: int) -> bool:
        """Whether ``num_queries`` queries over ``context`` cached latents cost fewer FLOPs absorbed
        than naive (decompressing each key's per-head K/V once, then per-head attention)."""
        H, r = self.n_heads, self.rank
        naive = context * r * H * (self.nope + self.v_dim) + num_queries * context * H * (self.nope + self.rope + self.v_dim)
        absorbed = num_queries * context * H * (2 * r + self.rope) + num_queries * H * r * (self.nope + self.v_dim)
        return absorbed < naive

    def attend_blocks(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
                      latents: Iterable[tuple[torch.Tensor, torch.Tensor, int]], q_start: int,
                      absorb: bool | None = None, q_tile: int | None = None, kernel: str = "online") -> torch.Tensor:
        """One sequence's queries over its cached latents, one block at a time (causal).

        q_nope [S,H,nope], q_pe [S,H,rope] at positions ``q_start..q_start+S-1``; ``latents`` yields
        ``(c_kv [T_b, r], k_pe [T_b, rope], start)`` blocks (views of the cache where possible), which
        must include every position up to ``q_start + S - 1`` -> ``[S, H, v]``.
        ``absorb``: the path; None picks the one with fewer FLOPs for this many queries and context.
        ``kernel``: :func:`dsv3.kernels.blocked_attention.blocked_attention`'s (``"online"`` softmax or
        torch's fused CPU ``"flash"`` kernel per block). Nothing per-head is ever built for more than one
        block, nor scores for more than one tile.
        """
        S = q_nope.shape[0]
        if absorb is None:
            absorb = self.absorbed_is_cheaper(S, q_start + S)
        tile = {"kernel": kernel} if q_tile is None else {"q_tile": q_tile, "kernel": kernel}
        if absorb:
            q = torch.cat([self.absorb_query(q_nope), q_pe], dim=-1).transpose(0, 1)   # [H,S,r+rope]

            def shared(blocks):  # every head attends over the same latent: k [1,T_b,r+rope], v = c_kv
                for c_kv, k_pe, start in blocks:
                    yield torch.cat([c_kv, k_pe], dim=-1)[None], c_kv[None], start

            o_lat = blocked_attention(q.contiguous(), shared(latents), self.softmax_scale, q_start, **tile)
            return self.absorb_output(o_lat.transpose(0, 1))                      # [S,H,v]
        H = self.n_heads
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1).contiguous()        # [H,S,qk]

        def per_head(blocks):  # decompress this block's keys and values only
            for c_kv, k_pe, start in blocks:
                Tb = c_kv.shape[0]
                kv = self.kv_b_proj(c_kv).view(Tb, H, self.nope + self.v_dim).transpose(0, 1)   # [H,T_b,nope+v]
                k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
                k = torch.cat([k_nope, k_pe[None].expand(H, Tb, self.rope)], dim=-1)          # [H,T_b,qk]
                yield k, v.contiguous(), start

        return blocked_attention(q, per_head(latents), self.softmax_scale, q_start, **tile).transpose(0, 1)

    def absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention straight over the latents; ``mask`` [S,T] or [B,S,T] bool (True = may attend) or None."""
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)                     # [B,S,H,r]
        scores = torch.einsum("bshr,btr->bsht", q_lat, c_kv) + torch.einsum("bshd,btd->bsht", q_pe, k_pe)
        scores = scores.float() * self.softmax_scale
        if mask is not None:
            m = mask if mask.dim() == 3 else mask.unsqueeze(0)                    # [B or 1, S, T]
            scores = scores.masked_fill(~m[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)                                 # [B,S,H,T]
        o_lat = torch.einsum("bsht,btr->bshr", p, c_kv)                           # [B,S,H,r]
        return torch.einsum("bshr,hvr->bshv", o_lat, w_uv)                        # [B,S,H,v]
