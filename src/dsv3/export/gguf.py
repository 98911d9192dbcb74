"""GGUF export for llama.cpp's ``deepseek2`` architecture, written with the ``gguf`` library.

Checked against the llama.cpp vendored in llama-cpp-python 0.3.36 (``src/models/deepseek2.cpp``,
``src/llama-model.cpp``, ``src/llama-graph.cpp`` ``build_moe_ffn``, ``src/llama-context.cpp`` YaRN,
``src/llama-vocab.cpp``) and its ``convert_hf_to_gguf.py`` ``DeepseekV2Model``, whose file layout this
matches, with two differences: the MTP module is kept (this llama.cpp reads
``deepseek2.nextn_predict_layers`` and the ``blk.N.nextn.*`` tensors) and the tokenizer needs no
hash lookup (our pre-tokenizer is detected from ``tokenizer.json`` itself).

**Metadata** (``deepseek2.`` prefix): ``block_count`` (main layers + MTP layers),
``nextn_predict_layers``, ``context_length``, ``embedding_length``, ``feed_forward_length``,
``vocab_size``, ``leading_dense_block_count``, ``attention.head_count``, ``attention.head_count_kv``
(1: llama.cpp runs MLA absorbed, as MQA over the latent), ``attention.key_length`` /
``value_length`` (the latent widths ``kv_lora_rank + qk_rope_head_dim`` / ``kv_lora_rank``),
``attention.key_length_mla`` / ``value_length_mla`` (the per-head widths after decompression),
``attention.q_lora_rank``, ``attention.kv_lora_rank``, ``attention.layer_norm_rms_epsilon``,
``rope.dimension_count``, ``rope.freq_base``, ``rope.scaling.*`` (YaRN: ``type``, ``factor``,
``original_context_length``, ``yarn_beta_fast``, ``yarn_beta_slow``, ``yarn_log_multiplier`` =
0.1 * ``mscale_all_dim``, the converter's convention that llama.cpp divides back), and the router:
``expert_feed_forward_length``, ``expert_count``, ``expert_used_count``, ``expert_shared_count``,
``expert_weights_scale``, ``expert_weights_norm``, ``expert_gating_func`` (sigmoid V3, softmax V2),
``expert_group_count`` / ``expert_group_used_count`` (V3 group-limited routing). Then
``tokenizer.ggml.*`` (``model`` gpt2, ``pre``, ``tokens``, ``token_type``, ``merges``,
``bos/eos/padding_token_id``, ``add_bos_token``, ``add_eos_token``) and ``tokenizer.chat_template``.

**Tensors** (numpy shapes here; GGUF stores the reverse): ``token_embd``, ``output_norm``,
``output`` (absent when tied), and per block ``blk.N.``: ``attn_norm``, ``attn_q_a`` /
``attn_q_a_norm`` / ``attn_q_b`` (or ``attn_q`` without q-LoRA), ``attn_kv_a_mqa``,
``attn_kv_a_norm``, ``attn_k_b`` ``[H, kv_lora_rank, qk_nope]`` and ``attn_v_b`` ``[H, v_head,
kv_lora_rank]`` (``kv_b_proj`` split per head, the key half transposed, for the absorbed form),
``attn_output``, ``ffn_norm``; dense ``ffn_gate/up/down``; MoE ``ffn_gate_inp``,
``exp_probs_b.bias`` (V3's selection bias), stacked ``ffn_gate/up/down_exps`` ``[E, out, in]``,
``ffn_gate/up/down_shexp``; MTP block ``N = num_hidden_layers + k`` adds ``nextn.eh_proj``,
``nextn.enorm``, ``nextn.hnorm``, ``nextn.shared_head_norm`` (embedding and head are shared).
Norms, 1-D tensors and the router stay F32 in every output type, as llama.cpp's converter keeps them.

**Streaming.** The checkpoint is loaded once by :func:`dsv3.load_pretrained` (its dtype; FP8
dequantizes to fp32, or to bf16 for a bf16 export: :func:`load_dtype`), then each GGUF tensor is converted and written straight to the file (header
and tensor table first), stacked experts one expert at a time: the output never sits in memory.

What llama.cpp cannot represent is refused with :class:`ExportError` naming the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..checkpoint import hf_names, load_pretrained
from ..config import ModelConfig
from ..tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer

ARCH = "deepseek2"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 values per scale
F16_MAX = float(np.finfo(np.float16).max)
# llama.cpp's name for the GPT-2 pre-tokenizer regex, which is what a ByteLevel(use_regex=True)
# pre-tokenizer applies (tokenizers' ByteLevel splits with exactly that regex before byte-mapping).
GPT2_PRE = "gpt-2"
# llama.cpp treats a deepseek2 model of these shapes as a V2-Lite variant and then never reads
# q_lora_rank (src/models/deepseek2.cpp, is_lite): (layers, vocab or None for any vocab).
LLAMA_CPP_LITE_SHAPES = ((26, None), (27, None), (48, 128256))
LLAMA_MAX_EXPERTS = 1024  # src/llama-hparams.h
LLAMA_MAX_LAYERS = 512


class ExportError(ValueError):
    """The checkpoint can't be written as a GGUF llama.cpp reads the same way; the message says why."""


# ---------------------------------------------------------------------------------------------
# What llama.cpp can represent


@dataclass(frozen=True)
class Routing:
    """The router as llama.cpp's ``build_moe_ffn`` computes it (values to write, not config fields)."""

    gating: gguf.ExpertGatingFuncType
    norm: bool            # normalize the chosen experts' weights to sum 1
    scale: float          # then multiply them by this
    groups: tuple[int, int] | None  # (n_group, topk_group) for group-limited selection, else None


def routing(config: ModelConfig) -> Routing:
    """Translate our router (dsv3.model.moe.Router) into llama.cpp's terms, or raise ExportError.

    llama.cpp always normalizes-then-scales; our V2 softmax rule normalizes *or* scales, so the
    scale written for a normalized softmax router is 1. Group-limited selection in llama.cpp scores
    a group by the sum of its top-2 biased scores: V3's ``noaux_tc``. V2's ``group_limited_greedy``
    (group max) only exports when it keeps every group (then it is plain greedy).
    """
    c = config
    sigmoid = c.scoring_func == "sigmoid"
    gating = gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    if sigmoid:
        norm, scale = bool(c.norm_topk_prob), float(c.routed_scaling_factor)
    elif c.norm_topk_prob and c.num_experts_per_tok > 1:
        norm, scale = True, 1.0
    else:
        norm, scale = False, float(c.routed_scaling_factor)
    groups = None
    if c.topk_method in ("noaux_tc", "group_limited_greedy") and c.n_group > 1 and c.topk_group < c.n_group:
        if c.topk_method == "group_limited_greedy":
            raise ExportError(
                f"topk_method='group_limited_greedy' with topk_group={c.topk_group} < n_group={c.n_group}: "
                "llama.cpp scores expert groups by the sum of their top-2 scores (DeepSeek-V3's noaux_tc), "
                "not by the group maximum, so it would route differently")
        groups = (c.n_group, c.topk_group)
    return Routing(gating, norm, scale, groups)


def llama_cpp_reads_as_lite(config: ModelConfig) -> bool:
    """Whether llama.cpp's deepseek2 loader takes this shape for a V2-Lite variant (no q-LoRA)."""
    return any(config.num_hidden_layers == n and vocab in (None, config.vocab_size)
               for n, vocab in LLAMA_CPP_LITE_SHAPES)


def check_config(config: ModelConfig) -> list[str]:
    """Raise :class:`ExportError` for what llama.cpp's ``deepseek2`` can't represent; return notes
    about what it loads but handles in its own way."""
    c = config
    notes: list[str] = []
    n_blocks = c.num_hidden_layers + c.num_nextn_predict_layers
    if c.attention_bias or c.mlp_bias:
        raise ExportError("attention_bias/mlp_bias: llama.cpp's deepseek2 has no bias tensors")
    if n_blocks > LLAMA_MAX_LAYERS:
        raise ExportError(f"num_hidden_layers + num_nextn_predict_layers = {n_blocks}: llama.cpp allows "
                          f"at most {LLAMA_MAX_LAYERS} blocks")
    if c.n_routed_experts > LLAMA_MAX_EXPERTS:
        raise ExportError(f"n_routed_experts={c.n_routed_experts}: llama.cpp allows at most {LLAMA_MAX_EXPERTS}")
    # llama.cpp: block i is MoE iff i >= leading_dense_block_count (no moe_layer_freq).
    lead = leading_dense_blocks(c)
    for i in range(n_blocks):
        if c.is_moe_layer(i) != (i >= lead):
            raise ExportError(
                f"moe_layer_freq={c.moe_layer_freq}: layer {i} is {'MoE' if c.is_moe_layer(i) else 'dense'}, but "
                f"llama.cpp makes every layer from leading_dense_block_count={lead} on MoE and the ones before dense")
    if c.n_routed_experts > 0:
        if c.n_shared_experts < 1:
            raise ExportError("n_shared_experts=0: llama.cpp's deepseek2 MoE layers require the shared-expert "
                              "tensors (ffn_*_shexp)")
        routing(c)  # raises for routing llama.cpp computes differently
    if c.q_lora_rank and llama_cpp_reads_as_lite(c):
        raise ExportError(
            f"q_lora_rank={c.q_lora_rank} with num_hidden_layers={c.num_hidden_layers}: llama.cpp takes a "
            "deepseek2 model of this depth for a V2-Lite variant and ignores q_lora_rank (it would look for "
            "attn_q); change the depth or use q_lora_rank=null")
    y = c.yarn
    if y is not None:
        if c.yarn_mode != "always":
            raise ExportError(f"yarn_mode={c.yarn_mode!r}: llama.cpp applies YaRN at every context length; "
                              "only yarn_mode='always' exports")
        if y.get("attention_factor") not in (None, 1, 1.0):
            raise ExportError(f"rope_scaling.attention_factor={y['attention_factor']!r}: llama.cpp would also "
                              "scale the attention logits by its square; only the mscale/mscale_all_dim form exports")
        m_all = y.get("mscale_all_dim")
        m = y.get("mscale") or 1.0
        if not m_all:
            raise ExportError("rope_scaling.mscale_all_dim is missing or 0: llama.cpp's deepseek2 YaRN takes its "
                              "attention temperature from mscale_all_dim (yarn_log_multiplier) and cannot express "
                              "this config's cos/sin-only scaling")
        if float(m) != float(m_all):
            raise ExportError(f"rope_scaling.mscale={m!r} differs from mscale_all_dim={m_all!r}: llama.cpp's "
                              "deepseek2 assumes they are equal (as in every released V2/V3 config)")
    if c.num_nextn_predict_layers:
        notes.append(f"MTP kept: {c.num_nextn_predict_layers} block(s) from blk.{c.num_hidden_layers} "
                     "(deepseek2.nextn_predict_layers); llama.cpp loads them only when asked for MTP drafting")
        if c.num_nextn_predict_layers > 1 or not c.q_lora_rank or not c.is_moe_layer(c.num_hidden_layers):
            notes.append("llama.cpp's MTP draft graph needs exactly one MoE MTP block with q-LoRA; this model's "
                         "MTP loads but can't draft there")
    return notes


def leading_dense_blocks(config: ModelConfig) -> int:
    """``leading_dense_block_count``: every block when there are no routed experts."""
    n_blocks = config.num_hidden_layers + config.num_nextn_predict_layers
    return config.first_k_dense_replace if config.n_routed_experts > 0 else n_blocks


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass
class Vocab:
    """What ``tokenizer.ggml.*`` holds."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def detect_pre(spec: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a ``tokenizer.json`` dict, when we know one that splits alike."""
    pre = spec.get("pre_tokenizer") or {}
    if (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)):
        return GPT2_PRE
    return None


def tokenizer_vocab(tokenizer: Tokenizer, vocab_size: int, pre: str | None = None) -> Vocab:
    """Tokens (padded to the model's ``vocab_size``), token types, merges and pre-tokenizer name.

    Special tokens become CONTROL (llama.cpp then matches them in text only when asked to parse
    specials, as our encode never does); other added tokens USER_DEFINED; ids the tokenizer doesn't
    use UNUSED ``[PAD<id>]``. pre: force a llama.cpp pre-tokenizer name instead of detecting one.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: only byte-level BPE exports (tokenizer.ggml.model gpt2)")
    unsupported = [k for k in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix",
                               "dropout") if model.get(k)]
    if unsupported:
        raise ExportError(f"tokenizer.json BPE sets {', '.join(unsupported)}, which llama.cpp's gpt2 BPE does not do")
    if pre is None:
        pre = detect_pre(spec)
        if pre is None:
            raise ExportError(
                f"tokenizer.json normalizer={json.dumps(spec.get('normalizer'))}, pre_tokenizer="
                f"{json.dumps(spec.get('pre_tokenizer'))}: not the GPT-2 byte-level split that llama.cpp's "
                f"'{GPT2_PRE}' pre-tokenizer reproduces; pass the llama.cpp pre-tokenizer name that matches "
                "(--pre, e.g. deepseek-v3 for the released DeepSeek-V3 tokenizer)")
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} ids but the model's vocab_size is {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        i = added["id"]
        if i >= vocab_size:
            raise ExportError(f"added token {added['content']!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    merges = []
    for m in model.get("merges") or []:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        if " " in left or " " in right:
            raise ExportError(f"merge {m!r} holds a space, which GGUF's 'left right' merge strings can't encode")
        merges.append(f"{left} {right}")
    return Vocab(tokens, types, merges, pre)


def chat_template(directory: Path) -> str | None:
    """The ``chat_template`` of ``tokenizer_config.json`` in ``directory``, if any."""
    file = directory / TOKENIZER_CONFIG_FILE
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ExportError(f"{file}: not a valid JSON object ({e})") from e
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------
# Tensors


# Checkpoint name inside "model.layers.N." -> GGUF name inside "blk.N." (kv_b_proj and the
# experts are handled apart).
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "eh_proj.weight": "nextn.eh_proj.weight",
    "enorm.weight": "nextn.enorm.weight",
    "hnorm.weight": "nextn.hnorm.weight",
    "shared_head.norm.weight": "nextn.shared_head_norm.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


def split_kv_b(kv_b: torch.Tensor, n_heads: int, qk_nope: int, v_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj [H*(nope+v), R]`` -> ``attn_k_b [H, R, nope]``, ``attn_v_b [H, v, R]``.

    Each head's rows are its nope-key rows then its value rows; llama.cpp multiplies ``q_nope`` by
    the key half (hence transposed) to get a latent query, and the attended latent by the value half.
    """
    rows, rank = kv_b.shape
    if rows != n_heads * (qk_nope + v_head):
        raise ExportError(f"kv_b_proj has {rows} rows, expected num_attention_heads*(qk_nope_head_dim+v_head_dim)"
                          f" = {n_heads * (qk_nope + v_head)}")
    per_head = kv_b.view(n_heads, qk_nope + v_head, rank)
    k_b, v_b = per_head.split([qk_nope, v_head], dim=1)
    return k_b.transpose(1, 2), v_b


@dataclass
class Planned:
    """One GGUF tensor before it is written: name, numpy shape, storage type, and how to get its data."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: Callable[[], torch.Tensor]
    note: str | None = None  # why it isn't stored in the requested type


def storage_type(name: str, shape: tuple[int, ...], out_type: str) -> tuple[gguf.GGMLQuantizationType, str | None]:
    """The type a tensor is stored in, and the reason when that isn't ``out_type``'s."""
    f32 = gguf.GGMLQuantizationType.F32
    # llama.cpp's kernels expect 1-D tensors and norms in F32; the router stays F32 (as the converter
    # and llama-quantize keep it): its top-k picks are sensitive to rounding.
    if len(shape) == 1 or name.endswith("norm.weight") or ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return f32, None
    q = QTYPES[out_type]
    if q == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return gguf.GGMLQuantizationType.F16, (f"{name}: rows of {shape[-1]} values are not a multiple of "
                                               f"{Q8_0_BLOCK}, stored as F16 instead of Q8_0")
    return q, None


def plan_tensors(model: torch.nn.Module, out_type: str) -> list[Planned]:
    """Every GGUF tensor of ``model`` (a dsv3 Transformer), named through the checkpoint name table."""
    c: ModelConfig = model.config
    state = model.state_dict()
    out: list[Planned] = []

    def add(name: str, shape: tuple[int, ...], data: Callable[[], torch.Tensor]) -> None:
        qtype, note = storage_type(name, shape, out_type)
        out.append(Planned(name, tuple(shape), qtype, data, note))

    for ours, t in state.items():
        if c.tie_word_embeddings and ours == "lm_head.weight":
            continue
        hf, expert = hf_names(ours, tuple(t.shape), c)[0]
        if hf in TOP_NAMES:
            add(TOP_NAMES[hf], tuple(t.shape), lambda t=t: t)
            continue
        m = _LAYER.fullmatch(hf)
        if m is None:
            raise ExportError(f"no GGUF name for checkpoint tensor {hf!r}")
        block, rest = m.group(1), m.group(2)
        if expert is not None:  # stacked experts [E, out, in], as llama.cpp's ffn_*_exps
            e = _EXPERT.fullmatch(rest)
            if e is None:
                raise ExportError(f"no GGUF name for stacked expert tensor {ours!r}")
            add(f"blk.{block}.ffn_{e.group(1)}_exps.weight", tuple(t.shape), lambda t=t: t)
        elif rest == "self_attn.kv_b_proj.weight":
            h, nope, v, r = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
            add(f"blk.{block}.attn_k_b.weight", (h, r, nope),
                lambda t=t: split_kv_b(t, h, nope, v)[0])
            add(f"blk.{block}.attn_v_b.weight", (h, v, r),
                lambda t=t: split_kv_b(t, h, nope, v)[1])
        elif rest in LAYER_NAMES:
            add(f"blk.{block}.{LAYER_NAMES[rest]}", tuple(t.shape), lambda t=t: t)
        else:
            raise ExportError(f"no GGUF name for checkpoint tensor {hf!r}")
    return out


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype``."""
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType, name: str = "") -> np.ndarray:
    """The bytes of ``t`` as ``qtype`` (a numpy array whose ``nbytes`` is the stored size).

    A 3-D tensor (stacked experts, per-head MLA) is converted one slice at a time, so only one
    slice's float32 copy exists at once.
    """
    if t.dim() == 3:
        return np.concatenate([encode(x, qtype, name).reshape(-1) for x in t.unbind(0)])
    t = t.detach().contiguous()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()   # round-to-nearest-even, as ggml's
    x = t.float()
    if qtype == gguf.GGMLQuantizationType.F32:
        return x.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        peak = float(x.abs().max()) if x.numel() else 0.0
        if peak > F16_MAX:
            raise ExportError(f"{name}: |value| up to {peak:.4g} overflows F16 (max {F16_MAX:g}); use --type bf16 or f32")
        return x.to(torch.float16).numpy()
    return gguf.quants.quantize(x.numpy(), qtype)


# ---------------------------------------------------------------------------------------------
# The writer


def write_metadata(w: gguf.GGUFWriter, config: ModelConfig, name: str, out_type: str) -> None:
    """``general.*`` and ``deepseek2.*``: the model's shape as llama.cpp's deepseek2 loader reads it."""
    c = config
    n_blocks = c.num_hidden_layers + c.num_nextn_predict_layers
    w.add_name(name)
    w.add_file_type(int(FILE_TYPES[out_type]))
    if out_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(n_blocks)
    if c.num_nextn_predict_layers:
        w.add_nextn_predict_layers(c.num_nextn_predict_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_vocab_size(c.vocab_size)
    w.add_leading_dense_block_count(leading_dense_blocks(c))
    # MLA as llama.cpp runs it: MQA with one latent "head" of key width R + rope and value width R,
    # decompressed per head to the _mla widths.
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_q_lora_rank(c.q_lora_rank or 0)  # 0 = no q-LoRA (attn_q); the loader requires the key
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    y = c.yarn
    if y is None:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(y["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(y["original_max_position_embeddings"]))
        # the same defaults dsv3.model.rope uses
        w.add_rope_scaling_yarn_beta_fast(float(y.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(y.get("beta_slow") or 1))
        # convert_hf_to_gguf writes 0.1 * mscale_all_dim and llama.cpp divides by 0.1 again
        w.add_rope_scaling_yarn_log_mul(0.1 * float(y["mscale_all_dim"]))
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts if c.n_routed_experts else 0)
    if c.n_routed_experts:
        r = routing(c)
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_weights_scale(r.scale)
        w.add_expert_weights_norm(r.norm)
        w.add_expert_gating_func(r.gating)
        if r.groups is not None:
            w.add_expert_group_count(r.groups[0])
            w.add_expert_group_used_count(r.groups[1])


def write_tokenizer(w: gguf.GGUFWriter, tokenizer: Tokenizer, vocab: Vocab, template: str | None) -> None:
    """``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    # llama.cpp then starts plain-text prompts with BOS, as dsv3.LLM does; chat prompts rendered by
    # the template (which writes BOS itself) are tokenized without it by llama.cpp's chat paths.
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if template is not None:
        w.add_chat_template(template)


def load_dtype(config: ModelConfig, out_type: str) -> torch.dtype | None:
    """The dtype to load the checkpoint in so that every value is rounded once, to the output type:
    the stored dtype (None) for f32/f16/bf16 checkpoints; for FP8 ones, whose dequantized values
    (fp8 * fp32 scale) are exact only in fp32, float32 -- or bfloat16 for a bf16 export."""
    fp8 = (config.quantization_config or {}).get("quant_method") == "fp8" or config.torch_dtype in (
        "float8_e4m3fn", "fp8")
    if not fp8:
        return None
    return torch.bfloat16 if out_type == "bf16" else torch.float32


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16", pre: str | None = None,
                name: str | None = None) -> dict:
    """Write the checkpoint directory ``src`` (HF layout with our tokenizer files) as GGUF ``out``.

    out_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the weight matrices (norms, 1-D tensors and
    the router stay F32; a q8_0 tensor whose rows aren't a multiple of 32 falls back to F16).
    pre: llama.cpp pre-tokenizer name to write instead of the detected one. name: ``general.name``
    (default: the directory name). The file is written under ``out + ".tmp"`` and renamed at the end.
    Returns a summary: path, type, tensor count, bytes, the F16 fallbacks and notes.
    """
    if out_type not in OUT_TYPES:
        raise ExportError(f"type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; give the output .gguf file name")
    # Everything that can refuse the export is checked before the weights are read.
    config = ModelConfig.from_json_file(src)
    check_config(config)
    tokenizer = Tokenizer.load(src)
    vocab = tokenizer_vocab(tokenizer, config.vocab_size, pre)
    template = chat_template(src)
    model = load_pretrained(src, dtype=load_dtype(config, out_type))
    config = model.config  # without MTP when the checkpoint holds no MTP weights
    notes = check_config(config)
    if config.bos_token_id not in (None, tokenizer.bos_id) or config.eos_token_id not in (None, tokenizer.eos_id):
        notes.append(f"config.json bos/eos ids ({config.bos_token_id}, {config.eos_token_id}) differ from the "
                     f"tokenizer's ({tokenizer.bos_id}, {tokenizer.eos_id}); the GGUF uses the tokenizer's")
    if template is None:
        notes.append(f"{src / TOKENIZER_CONFIG_FILE} has no chat_template; the GGUF carries none")
    plan = plan_tensors(model, out_type)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        write_metadata(w, config, name or src.resolve().name, out_type)
        write_tokenizer(w, tokenizer, vocab, template)
        for p in plan:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with torch.no_grad():
            for p in plan:
                w.write_tensor_data(encode(p.data(), p.qtype, p.name))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "src": str(src), "path": str(out), "type": out_type, "tensors": len(plan),
        "bytes": out.stat().st_size, "pre": vocab.pre, "mtp_blocks": config.num_nextn_predict_layers,
        "fallbacks": [p.note for p in plan if p.note], "notes": notes,
    }
