"""The Hugging Face checkpoint layout of DeepSeek-V3: tensor names and which weights are FP8.

One place for the rules that the checkpoint reader/writer (:mod:`dsv3.checkpoint`), FP8 inference
(:mod:`dsv3.quant`), FP8 training (:mod:`dsv3.train.fp8`), ``dsv3 convert`` and ``dsv3 info`` all
follow, so they can't drift apart:

- :data:`NAME_TABLE` / :func:`hf_names`: our state-dict name -> the checkpoint's tensor name(s);
- :func:`quantizable`: which checkpoint weights the official releases store as FP8;
- :func:`fp8_targets`: the modules of a model those weights belong to;
- :func:`fp8_quantization_config` / :func:`fp8_block`: the ``quantization_config`` of ``config.json``.

Nothing here reads or writes files, so every module above can import it without a cycle.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from . import fp8
from .config import ModelConfig
from .model.moe import RoutedExperts

# ---------------------------------------------------------------------------------------------
# The name table: our state-dict name (regex) -> checkpoint name (template).
#   {0}, {1}, ... are the regex groups; {mtp} is the checkpoint layer index of MTP depth {0}
#   (num_hidden_layers + depth index); {expert} marks stacked experts, one checkpoint tensor each.
# ---------------------------------------------------------------------------------------------
NAME_TABLE: list[tuple[str, str]] = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", "model.layers.{0}.mlp.experts.{expert}.{1}.weight"),
    # FP8 experts kept as FP8 (dsv3.quant): stacked per-expert block scales
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)_scale_inv",
     "model.layers.{0}.mlp.experts.{expert}.{1}.weight_scale_inv"),
    (r"layers\.(\d+)\.(.+)", "model.layers.{0}.{1}"),
    (r"mtp\.(\d+)\.block\.mlp\.experts\.(gate_proj|up_proj|down_proj)", "model.layers.{mtp}.mlp.experts.{expert}.{1}.weight"),
    (r"mtp\.(\d+)\.block\.mlp\.experts\.(gate_proj|up_proj|down_proj)_scale_inv",
     "model.layers.{mtp}.mlp.experts.{expert}.{1}.weight_scale_inv"),
    (r"mtp\.(\d+)\.block\.(.+)", "model.layers.{mtp}.{1}"),
    (r"mtp\.(\d+)\.norm\.weight", "model.layers.{mtp}.shared_head.norm.weight"),
    (r"mtp\.(\d+)\.(enorm|hnorm|eh_proj)\.(weight|bias)", "model.layers.{mtp}.{1}.{2}"),
]
# The checkpoint stores the shared embedding and head again under every MTP layer.
MTP_SHARED_COPIES = {
    "embed_tokens.weight": "model.layers.{mtp}.embed_tokens.weight",
    "lm_head.weight": "model.layers.{mtp}.shared_head.head.weight",
}
_COMPILED = [(re.compile(ours + r"\Z"), hf) for ours, hf in NAME_TABLE]
# Every linear layer of attention and of the dense, shared and routed experts.
_QUANTIZABLE = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                          r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight\Z")


def hf_names(name: str, shape: tuple[int, ...], config: ModelConfig) -> list[tuple[str, int | None]]:
    """Checkpoint name(s) of one of our state-dict entries, with the expert index for stacked experts."""
    for pattern, template in _COMPILED:
        m = pattern.match(name)
        if m is None:
            continue
        groups = m.groups()
        mtp = config.num_hidden_layers + int(groups[0]) if name.startswith("mtp.") else None
        if "{expert}" in template:
            return [(template.format(*groups, mtp=mtp, expert=e), e) for e in range(shape[0])]
        return [(template.format(*groups, mtp=mtp), None)]
    raise KeyError(f"no checkpoint name for parameter {name!r}")


def name_map(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """Checkpoint name -> (our name, expert index) for every tensor ``model`` (a Transformer) holds."""
    out: dict[str, tuple[str, int | None]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for hf, e in hf_names(name, tuple(t.shape), model.config):
            out[hf] = (name, e)
    return out


def shared_copy_names(config: ModelConfig) -> dict[str, str]:
    """Checkpoint names of the MTP layers' copies of shared tensors -> our shared tensor."""
    out = {}
    for k in range(config.num_nextn_predict_layers):
        for ours, template in MTP_SHARED_COPIES.items():
            out[template.format(mtp=config.num_hidden_layers + k)] = ours
    return out


# ---------------------------------------------------------------------------------------------
# FP8: which weights, and how config.json describes them
# ---------------------------------------------------------------------------------------------
def quantizable(hf_name: str) -> bool:
    """Which weights the official FP8 checkpoints store in FP8: every linear layer of attention and
    the MLPs/experts. Embedding, head, router gate, norms (and the small MTP eh_proj) stay high precision."""
    return hf_name.endswith(".weight") and _QUANTIZABLE.search(hf_name) is not None


def fp8_targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(name, module, checkpoint_name)`` for every layer the official checkpoints keep in FP8:
    the ``nn.Linear`` layers of attention and MLPs and the stacked routed experts (checked with
    :func:`quantizable` on the checkpoint name, so the model side and the file side agree).

    The module list is taken before the first yield, so a caller may replace modules as it goes.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            param, shape = name + ".weight", tuple(module.weight.shape)
        elif isinstance(module, RoutedExperts):
            param, shape = name + ".gate_proj", tuple(module.gate_proj.shape)
        else:
            continue
        hf = hf_names(param, shape, model.config)[0][0]
        if quantizable(hf):
            yield name, module, hf


def fp8_quantization_config(block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None) -> dict:
    """The ``quantization_config`` of ``config.json`` for weights in FP8 ``block`` blocks (the official
    V3 layout; ``scale_fmt="ue8m0"`` as V3.1 writes it)."""
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    if scale_fmt:
        qc["scale_fmt"] = scale_fmt
    return qc


def fp8_block(config: ModelConfig) -> tuple[int, int]:
    """The FP8 weight block of ``config``'s ``quantization_config`` (128 x 128 when it names none)."""
    q = config.quantization_config or {}
    b = q.get("weight_block_size") or list(fp8.DEFAULT_BLOCK)
    return int(b[0]), int(b[1])
