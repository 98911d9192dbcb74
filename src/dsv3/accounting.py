"""Cost accounting from a :class:`~dsv3.config.ModelConfig` alone: parameters, FLOPs, cache bytes.

Everything here is a closed-form count over the config; no model is built, so the 671B ``v3``
preset is as instant as ``tiny``. The counts mirror ``dsv3.model`` module by module, and the tests
hold them equal to ``sum(p.numel() for p in model.parameters())`` of a real ``dsv3.Transformer``.

Conventions (each one also stated where it is used):

* **Parameters** are ``nn.Parameter`` elements, counted once each (a tied ``lm_head`` shares the
  embedding's tensor, so it adds nothing). Buffers are not parameters: the V3 router's
  ``e_score_correction_bias`` (one fp32 value per routed expert per MoE layer) is reported
  separately as ``router_bias_buffer`` and is in no other count.
* **total** is the main model only: embedding, blocks, final norm, head. The MTP modules' own
  parameters are **mtp**; their embedding and output head are the main model's, so they are not
  counted again there. The HF checkpoint nevertheless stores ``embed_tokens`` and
  ``shared_head.head`` once more under each MTP layer: that is **mtp_shared_copies**, and
  ``checkpoint_total = total + mtp + mtp_shared_copies`` is the size of the released checkpoint's
  tensors (V3: 684.5B, the "685B" of the model card; the FP8 ``weight_scale_inv`` tensors and the
  router bias buffers are on top and are tiny).
* **active** is what one token of the main model touches: everything except the routed experts it
  was not sent to, i.e. ``total - (n_routed_experts - num_experts_per_tok) * expert`` per MoE layer.
  It includes the embedding table; **active_no_embedding** leaves out the input-embedding table
  (when the head is tied to it the table is also the output head, which every token uses, so nothing
  is taken out). The papers' round numbers fit both for V3 (37.55B / 36.63B for "37B") and V2
  (21.38B / 20.85B for "21B"); V2-Lite's "2.4B" is the one without the embedding (2.45B; 2.66B with).
* **FLOPs** per token are the nanochat/PaLM estimate: ``2 * N_matmul`` for the weight matmuls, where
  ``N_matmul`` is the active matrix weights (every Linear, the router, the chosen and shared experts,
  and ``lm_head`` -- counted even when tied), without the embedding lookup, norms or biases; plus
  attention ``2 * L * H * (qk_head_dim + v_head_dim) * seq_len`` for ``QK^T`` and ``PV`` against the
  **full** context of ``seq_len`` keys (no halving for the causal mask, as in PaLM's MFU and nanochat).
  Training is three times the forward (backward = 2x forward).
* **Cache bytes** per token: MLA caches only normalized ``c_kv`` and the rotated shared ``k_pe``, i.e.
  ``kv_lora_rank + qk_rope_head_dim`` values per layer. The comparison is a standard multi-head cache of
  per-head keys and values, ``H * (qk_head_dim + v_head_dim)`` values per layer.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig

# Bytes per element of the cache dtypes the CLI understands.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "float8_e4m3fn": 1}

__all__ = ["DTYPE_BYTES", "param_counts", "flops_per_token", "cache_bytes_per_token",
           "full_kv_cache_bytes_per_token", "summary", "format_summary"]


# ---------------------------------------------------------------------- per-module counts
# Each helper returns (params, matmul_weights): every parameter of the module, and the part of it
# that is a matrix multiplied against the activations (what FLOPs are counted from).

def _linear(n_in: int, n_out: int, bias: bool) -> tuple[int, int]:
    w = n_in * n_out
    return w + (n_out if bias else 0), w


def _mla(c: ModelConfig) -> tuple[int, int]:
    """One MLA module (dsv3/model/mla.py), including its own q_a/kv_a layernorms."""
    H, D = c.num_attention_heads, c.hidden_size
    parts = []
    if c.uses_q_lora:
        parts.append(_linear(D, c.q_lora_rank, c.attention_bias))           # q_a_proj
        parts.append((c.q_lora_rank, 0))                                    # q_a_layernorm
        parts.append(_linear(c.q_lora_rank, H * c.qk_head_dim, False))      # q_b_proj (never biased)
    else:
        parts.append(_linear(D, H * c.qk_head_dim, False))                  # q_proj (never biased)
    parts.append(_linear(D, c.kv_lora_rank + c.qk_rope_head_dim, c.attention_bias))  # kv_a_proj_with_mqa
    parts.append((c.kv_lora_rank, 0))                                       # kv_a_layernorm
    parts.append(_linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), False))  # kv_b_proj
    parts.append(_linear(H * c.v_head_dim, D, c.attention_bias))            # o_proj
    return sum(p for p, _ in parts), sum(m for _, m in parts)


def _swiglu(hidden: int, inter: int, bias: bool) -> tuple[int, int]:
    """gate_proj + up_proj + down_proj (dsv3/model/mlp.py)."""
    gate, gm = _linear(hidden, inter, bias)
    down, dm = _linear(inter, hidden, bias)
    return 2 * gate + down, 2 * gm + dm


def _expert(c: ModelConfig) -> int:
    """One routed expert: stacked gate/up/down slices, never biased (dsv3/model/moe.py)."""
    return 3 * c.hidden_size * c.moe_intermediate_size


def _shared_experts(c: ModelConfig) -> tuple[int, int]:
    """The always-on experts, fused into one SwiGLU of width ``n_shared * moe_intermediate_size``."""
    if c.n_shared_experts <= 0:
        return 0, 0
    return _swiglu(c.hidden_size, c.n_shared_experts * c.moe_intermediate_size, c.mlp_bias)


def _block(c: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Parameter groups of one Block (main layer or the block inside an MTP module)."""
    attn, attn_mm = _mla(c)
    out = {"attention": attn, "attention_matmul": attn_mm, "norms": 2 * c.hidden_size,
           "dense_mlp": 0, "dense_mlp_matmul": 0, "routed_experts": 0, "routed_experts_active": 0,
           "shared_experts": 0, "shared_experts_matmul": 0, "router": 0, "router_bias_buffer": 0}
    if c.is_moe_layer(layer_idx):
        E = c.n_routed_experts
        out["routed_experts"] = E * _expert(c)
        out["routed_experts_active"] = c.num_experts_per_tok * _expert(c)
        out["shared_experts"], out["shared_experts_matmul"] = _shared_experts(c)
        out["router"] = E * c.hidden_size                                  # mlp.gate.weight, no bias
        if c.topk_method == "noaux_tc":
            out["router_bias_buffer"] = E                                  # buffer, not a parameter
    else:
        out["dense_mlp"], out["dense_mlp_matmul"] = _swiglu(c.hidden_size, c.intermediate_size, c.mlp_bias)
    return out


def _sum_blocks(blocks: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(b[k] for b in blocks) for k in blocks[0]}  # num_hidden_layers >= 1 (validated)


def _block_params(b: dict[str, int]) -> int:
    return b["attention"] + b["norms"] + b["dense_mlp"] + b["routed_experts"] + b["shared_experts"] + b["router"]


def _block_active(b: dict[str, int]) -> int:
    return _block_params(b) - b["routed_experts"] + b["routed_experts_active"]


def _block_matmul_active(b: dict[str, int]) -> int:
    return (b["attention_matmul"] + b["dense_mlp_matmul"] + b["routed_experts_active"]
            + b["shared_experts_matmul"] + b["router"])


def _mtp_blocks(c: ModelConfig) -> list[dict[str, int]]:
    # MTP depth k's block sits at checkpoint layer index num_hidden_layers + k - 1 and is MoE or dense
    # by the same rule as any layer (dsv3/model/mtp.py).
    return [_block(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers)]


def _mtp_extra(c: ModelConfig) -> tuple[int, int]:
    """Per MTP module, outside its block: enorm, hnorm, shared_head.norm and eh_proj [D, 2D]."""
    D = c.hidden_size
    return 3 * D + 2 * D * D, 2 * D * D


# ---------------------------------------------------------------------- public API
def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by formula; see the module docstring for what each key includes.

    Keys: ``total`` (main model, no MTP) = ``embedding + head + attention + dense_mlp + moe + norms``;
    ``moe`` = ``moe_routed_experts + moe_shared_experts + moe_router`` (router weight only: its
    ``e_score_correction_bias`` is a buffer, reported as ``router_bias_buffer`` and excluded everywhere);
    ``mtp`` (MTP modules' own parameters), ``mtp_shared_copies`` (embedding + head stored again per MTP
    layer in HF checkpoints), ``checkpoint_total``; ``active`` (per token, with the embedding table),
    ``active_no_embedding``, ``mtp_active``; ``routed_expert`` (one expert), ``moe_layers``,
    ``dense_layers``.
    """
    c = config
    D, V = c.hidden_size, c.vocab_size
    L = c.num_hidden_layers
    blocks = [_block(c, i) for i in range(L)]
    b = _sum_blocks(blocks)
    n_moe = sum(1 for i in range(L) if c.is_moe_layer(i))

    embedding = V * D
    head = 0 if c.tie_word_embeddings else V * D          # tied: the same tensor, counted once
    final_norm = D
    moe = b["routed_experts"] + b["shared_experts"] + b["router"]
    total = embedding + head + final_norm + sum(_block_params(x) for x in blocks)
    assert total == embedding + head + b["attention"] + b["dense_mlp"] + moe + b["norms"] + final_norm

    active = total - b["routed_experts"] + b["routed_experts_active"]
    # With a tied head the table is also the output projection, used by every token: keep it.
    active_no_embedding = active - (0 if c.tie_word_embeddings else embedding)

    mtp_blocks = _mtp_blocks(c)
    mtp_extra, _ = _mtp_extra(c)
    mtp = sum(_block_params(x) + mtp_extra for x in mtp_blocks)
    mtp_active = sum(_block_active(x) + mtp_extra for x in mtp_blocks)
    mtp_shared_copies = c.num_nextn_predict_layers * 2 * V * D   # embed_tokens + shared_head.head

    return {
        "total": total,
        "embedding": embedding,
        "head": head,
        "attention": b["attention"],
        "dense_mlp": b["dense_mlp"],
        "moe": moe,
        "moe_routed_experts": b["routed_experts"],
        "moe_shared_experts": b["shared_experts"],
        "moe_router": b["router"],
        "norms": b["norms"] + final_norm,
        "router_bias_buffer": b["router_bias_buffer"] + sum(x["router_bias_buffer"] for x in mtp_blocks),
        "active": active,
        "active_no_embedding": active_no_embedding,
        "mtp": mtp,
        "mtp_active": mtp_active,
        "mtp_shared_copies": mtp_shared_copies,
        "checkpoint_total": total + mtp + mtp_shared_copies,
        "routed_expert": _expert(c) if c.n_routed_experts > 0 else 0,
        "moe_layers": n_moe,
        "dense_layers": L - n_moe,
    }


def _attention_flops(c: ModelConfig, n_layers: int, seq_len: int) -> int:
    # QK^T over qk_head_dim and PV over v_head_dim, per head, against all seq_len keys (no causal halving).
    return 2 * n_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len


def flops_per_token(config: ModelConfig, seq_len: int = 4096) -> dict[str, int]:
    """Forward and training FLOPs per token at context ``seq_len`` (PaLM / nanochat convention).

    ``forward = 2 * matmul_params + attention``: ``matmul_params`` are the active weight matrices
    (attention projections, dense MLPs, router, shared and the ``num_experts_per_tok`` chosen
    experts, ``lm_head`` -- even when tied), excluding the embedding lookup, norms and biases;
    ``attention = 2 * L * H * (qk_head_dim + v_head_dim) * seq_len`` counts ``QK^T`` and ``PV`` against
    the full context, not the causal half. ``training = 3 * forward``. ``mtp_forward`` is the extra
    forward cost of the MTP modules (eh_proj, block, its own pass through the shared head);
    ``training_with_mtp = 3 * (forward + mtp_forward)``.
    """
    c = config
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be > 0")
    head = c.vocab_size * c.hidden_size
    blocks = [_block(c, i) for i in range(c.num_hidden_layers)]
    matmul = sum(_block_matmul_active(b) for b in blocks) + head
    attention = _attention_flops(c, c.num_hidden_layers, seq_len)
    forward = 2 * matmul + attention

    mtp_blocks = _mtp_blocks(c)
    _, eh = _mtp_extra(c)
    mtp_matmul = sum(_block_matmul_active(b) + eh + head for b in mtp_blocks)
    mtp_forward = 2 * mtp_matmul + _attention_flops(c, len(mtp_blocks), seq_len)
    return {
        "seq_len": seq_len,
        "matmul_params": matmul,
        "forward_matmul": 2 * matmul,
        "forward_attention": attention,
        "forward": forward,
        "training": 3 * forward,
        "mtp_forward": mtp_forward,
        "training_with_mtp": 3 * (forward + mtp_forward),
    }


def cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, include_mtp: bool = False) -> int:
    """MLA latent cache per token: ``layers * (kv_lora_rank + qk_rope_head_dim) * dtype_bytes``.

    ``include_mtp`` adds the MTP modules' attention layers (used when MTP drafts tokens for
    speculative decoding). V3 in bf16: 61 * 576 * 2 = 70,272 bytes.
    """
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    return layers * config.latent_dim * dtype_bytes


def full_kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2, include_mtp: bool = False) -> int:
    """A standard per-head K/V cache of the same model, for comparison:
    ``layers * H * (qk_head_dim + v_head_dim) * dtype_bytes`` (V3 in bf16: 4,997,120 bytes)."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
    return layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * dtype_bytes


def rope_info(config: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """RoPE / YaRN settings and whether YaRN is used for a context of ``seq_len`` tokens."""
    c = config
    y = c.yarn
    info: dict[str, Any] = {
        "rope_theta": c.rope_theta,
        "qk_rope_head_dim": c.qk_rope_head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "yarn": y is not None,
    }
    if y is not None:
        info.update({
            "yarn_mode": c.yarn_mode,
            "yarn_active": c.yarn_active(seq_len),
            "yarn_active_seq_len": seq_len,
            "factor": y.get("factor"),
            "original_max_position_embeddings": y.get("original_max_position_embeddings"),
            "beta_fast": y.get("beta_fast"),
            "beta_slow": y.get("beta_slow"),
            "mscale": y.get("mscale"),
            "mscale_all_dim": y.get("mscale_all_dim"),
        })
    return info


# ------------------------------------------------------------------------------------- decode traffic
def expected_distinct_experts(n_experts: int, k: int, batch: int) -> float:
    """Expected number of distinct experts ``batch`` tokens pick, ``k`` each of ``n_experts``, uniformly."""
    if n_experts == 0:
        return 0.0
    return n_experts * (1 - (1 - k / n_experts) ** batch)


def decode_step_bytes(config: ModelConfig, batch: int, mean_context: float, dtype_bytes: int,
                      experts_per_moe_layer: float | None = None) -> dict:
    """Bytes a decode step must move, from the config alone, all weights at ``dtype_bytes`` each: the
    numerator of the memory roofline (``dsv3.bench.roofline``, which explains the count).

    The routed experts a batch touches are :func:`expected_distinct_experts` per MoE layer (uniform
    routing) unless ``experts_per_moe_layer`` says otherwise; the latent cache is read at
    ``mean_context`` positions. For a model in memory (quantized, mixed precision)
    :func:`dsv3.bench.roofline.model_step_bytes` counts its tensors instead.
    """
    p = param_counts(config)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    distinct = expected_distinct_experts(E, k, batch) if experts_per_moe_layer is None else experts_per_moe_layer
    weights = (p["total"] - p["embedding"] - p["moe_routed_experts"]
               + p["moe_layers"] * distinct * p["routed_expert"] + batch * config.hidden_size)
    cache = batch * mean_context * config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    return {"weights": weights * dtype_bytes, "cache": cache * dtype_bytes,
            "total": (weights + cache) * dtype_bytes, "experts_per_moe_layer": distinct}


def summary(config: ModelConfig, seq_len: int = 4096, dtype: str = "bf16", name: str | None = None) -> dict[str, Any]:
    """Everything above in one JSON-serializable dict: params, FLOPs at ``seq_len``, cache bytes in ``dtype``."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPE_BYTES)}")
    c = config
    nbytes = DTYPE_BYTES[dtype]
    latent = cache_bytes_per_token(c, nbytes)
    full = full_kv_cache_bytes_per_token(c, nbytes)
    return {
        "name": name,
        "model_type": c.model_type,
        "shape": {
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "q_lora_rank": c.q_lora_rank,
            "kv_lora_rank": c.kv_lora_rank, "qk_nope_head_dim": c.qk_nope_head_dim,
            "qk_rope_head_dim": c.qk_rope_head_dim, "v_head_dim": c.v_head_dim,
            "intermediate_size": c.intermediate_size, "moe_intermediate_size": c.moe_intermediate_size,
            "n_routed_experts": c.n_routed_experts, "n_shared_experts": c.n_shared_experts,
            "num_experts_per_tok": c.num_experts_per_tok, "first_k_dense_replace": c.first_k_dense_replace,
            "moe_layer_freq": c.moe_layer_freq, "num_nextn_predict_layers": c.num_nextn_predict_layers,
            "tie_word_embeddings": c.tie_word_embeddings,
        },
        "params": param_counts(c),
        "flops_per_token": flops_per_token(c, seq_len),
        "cache": {
            "dtype": dtype,
            "dtype_bytes": nbytes,
            "latent_values_per_token_per_layer": c.latent_dim,
            "latent_bytes_per_token": latent,
            "latent_bytes_per_token_with_mtp": cache_bytes_per_token(c, nbytes, include_mtp=True),
            "full_kv_bytes_per_token": full,
            "latent_over_full": latent / full,
        },
        "rope": rope_info(c, seq_len),
    }


# ---------------------------------------------------------------------- human formatting
def _count(n: float) -> str:
    """``671026404352 -> '671.03B'``: B and M units (K and plain below)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g} FLOP"


def _bytes(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.1f} {unit})"
    return f"{n:,} B"


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`summary`'s dict."""
    p, f, k, r, sh = s["params"], s["flops_per_token"], s["cache"], s["rope"], s["shape"]
    title = s.get("name") or s["model_type"]
    lines = [f"model: {title} ({s['model_type']})"]
    q = f"q_lora_rank={sh['q_lora_rank']}" if sh["q_lora_rank"] else "q_proj (no q LoRA)"
    lines.append(f"  shape: {sh['num_hidden_layers']} layers ({p['dense_layers']} dense, {p['moe_layers']} MoE), "
                 f"hidden {sh['hidden_size']}, {sh['num_attention_heads']} heads, vocab {sh['vocab_size']}, "
                 f"{q}, kv_lora_rank={sh['kv_lora_rank']}")
    if sh["n_routed_experts"]:
        lines.append(f"  experts: {sh['n_routed_experts']} routed (top-{sh['num_experts_per_tok']}, "
                     f"{_count(p['routed_expert'])} each) + {sh['n_shared_experts']} shared, "
                     f"width {sh['moe_intermediate_size']}")
    lines.append("parameters:")
    rows = [
        ("total (main model)", p["total"]),
        ("  embedding", p["embedding"]),
        ("  head" + (" (tied to embedding)" if sh["tie_word_embeddings"] else ""), p["head"]),
        ("  attention (MLA)", p["attention"]),
        ("  dense MLP", p["dense_mlp"]),
        ("  MoE", p["moe"]),
        ("    routed experts", p["moe_routed_experts"]),
        ("    shared experts", p["moe_shared_experts"]),
        ("    router", p["moe_router"]),
        ("  norms", p["norms"]),
        ("active per token", p["active"]),
        ("active per token, no embedding", p["active_no_embedding"]),
        (f"MTP modules ({sh['num_nextn_predict_layers']})", p["mtp"]),
        ("MTP embed+head copies in checkpoint", p["mtp_shared_copies"]),
        ("checkpoint total", p["checkpoint_total"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, n in rows:
        lines.append(f"  {name:<{width}}  {_count(n):>9}  ({n:,})")
    lines.append(f"FLOPs per token (seq_len {f['seq_len']}, full-context attention):")
    lines.append(f"  forward   {_flops(f['forward'])}  (matmul {_flops(f['forward_matmul'])}"
                 f" + attention {_flops(f['forward_attention'])})")
    lines.append(f"  training  {_flops(f['training'])}  (3x forward; with MTP {_flops(f['training_with_mtp'])})")
    lines.append(f"cache per token ({k['dtype']}):")
    lines.append(f"  MLA latent  {_bytes(k['latent_bytes_per_token'])}  "
                 f"({k['latent_values_per_token_per_layer']} values/layer)")
    lines.append(f"  full K/V    {_bytes(k['full_kv_bytes_per_token'])}  "
                 f"(latent is {100 * k['latent_over_full']:.1f}% of it)")
    rope = f"theta={r['rope_theta']:g}, rope dims={r['qk_rope_head_dim']} (interleaved pairs), " \
           f"max_position_embeddings={r['max_position_embeddings']}"
    lines.append(f"RoPE: {rope}")
    if r["yarn"]:
        how = ("applied from the config, like transformers" if r["yarn_mode"] == "always"
               else "only past original_max_position_embeddings, like the official demo")
        on = "on" if r["yarn_active"] else "off"
        lines.append(f"  YaRN: mode {r['yarn_mode']} ({how}); {on} at seq_len {r['yarn_active_seq_len']}; "
                     f"factor={r['factor']}, original_max_position_embeddings={r['original_max_position_embeddings']}, "
                     f"beta_fast={r['beta_fast']}, beta_slow={r['beta_slow']}, mscale={r['mscale']}, "
                     f"mscale_all_dim={r['mscale_all_dim']}")
    else:
        lines.append("  YaRN: off (no rope_scaling)")
    return "\n".join(lines)
