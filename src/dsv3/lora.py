"""LoRA and QLoRA adapters, applied to a model from outside by module replacement.

A LoRA layer keeps its base weight ``W`` frozen and learns a low-rank update (Hu et al. 2021)::

    y = x W^T (+ b) + (alpha / r) * dropout(x) A^T B^T       A [r, in], B [out, r]

``A`` starts random (kaiming-uniform, as PEFT does), ``B`` at zero, so a freshly applied adapter
changes nothing. With ``base_dtype="int8"`` (QLoRA-style) or ``"bf16"`` the frozen base is stored
compactly (int8 per output channel + scale, or bf16) and dequantized in the forward and backward
passes only; the adapter itself stays fp32.

:func:`apply_lora` puts :class:`LoRALinear` / :class:`LoRAExperts` in place of the targeted modules
with :func:`dsv3.replace.replace_module` (the model's classes are untouched) and freezes every other
parameter. Targets (:data:`TARGETS`) name our modules in the main layers (never the MTP modules,
which transformers' model does not have):

- ``q``: ``q_proj``, or ``q_a_proj`` and ``q_b_proj`` (q-LoRA configs); ``kv``: ``kv_a_proj_with_mqa``
  and ``kv_b_proj``; ``o``: ``o_proj``;
- ``shared``: the shared experts' ``gate_proj`` / ``up_proj`` / ``down_proj``;
- ``experts``: the routed experts. Ours are stacked ``[E, out, in]`` tensors; the adapter is per expert
  (``A [E, r, in]``, ``B [E, out, r]``) so that it saves as one LoRA pair per expert Linear, the module
  tree of the HF checkpoint (``mlp.experts.N.gate_proj``).

Saved adapters use PEFT's layout (:func:`save_adapter`): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<checkpoint module>.lora_A.weight`` /
``lora_B.weight``, so ``peft.PeftModel.from_pretrained(transformers_model, DIR)`` loads them (PEFT
converts the per-expert pairs onto transformers v5's fused experts itself). :func:`merge_lora` folds
the adapters into plain weights (``W + scale * B A``) and puts the original module classes back.

``modules_to_save`` (PEFT's option of that name) additionally trains whole modules outside the
low-rank scheme: ``embed`` (``embed_tokens``) and ``head`` (``lm_head``), the rows a chat template's
new special tokens live in, which a low-rank update of the attention and experts cannot give
meaning to. They are trained in place (their ``weight`` simply stays trainable) and saved whole in
the adapter under PEFT's names, ``base_model.model.model.embed_tokens.weight`` /
``base_model.model.lm_head.weight``, with ``"modules_to_save": ["embed_tokens", "lm_head"]`` in
``adapter_config.json``; PEFT (``ModulesToSaveWrapper.adapter_state_dict_load_map``) maps those
keys onto its ``...modules_to_save.default.weight`` copies when loading. The main layers' MTP
modules share this embedding and head, so they see the trained ones too.

The absorbed MLA path reads ``kv_b_proj.weight`` directly, not through the module's forward, so a
``kv`` adapter only acts in the naive path (the one training runs); merge before decoding with the
absorbed path (``dsv3.LLM(base, adapter=...)`` does).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .hf_layout import hf_names
from .model.mla import MLA
from .model.mlp import MLP
from .model.moe import MoE, RoutedExperts, dispatch_experts
from .quant.int_weights import dequantize_int8, quantize_int8
from .replace import adopt_tensors, replace_module

# target -> the attention Linear names it covers ("shared" and "experts" are MoE parts, below)
ATTENTION_TARGETS = {
    "q": ("q_proj", "q_a_proj", "q_b_proj"),
    "kv": ("kv_a_proj_with_mqa", "kv_b_proj"),
    "o": ("o_proj",),
}
TARGETS = (*ATTENTION_TARGETS, "shared", "experts")
DEFAULT_TARGETS = ("q", "kv", "o")
BASE_DTYPES = ("fp32", "bf16", "int8")
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"      # PEFT's file names (peft.utils.constants)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."           # PeftModel -> LoraModel -> the transformers model
# modules_to_save: our short name -> the attribute of our Transformer (= the transformers leaf name)
SAVE_MODULES = {"embed": "embed_tokens", "head": "lm_head"}
SAVED_ATTR = "lora_modules_to_save"          # on the model: the SAVE_MODULES names trained whole


class LoRAError(ValueError):
    """Bad LoRA settings or an adapter that does not fit the model; the message says why."""


# ------------------------------------------------------------------------------- the frozen base
class _FrozenMatmul(torch.autograd.Function):
    """``x @ W^T`` for a frozen ``W`` that is rebuilt (dequantized) on demand: the forward and the
    backward each materialize it once and drop it, so autograd never keeps a full-precision copy of a
    compact base weight alive between the passes (the point of QLoRA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight(x.dtype))                        # [..., in] -> [..., out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight(grad.dtype), None                 # [..., out] @ [out, in] -> [..., in]


def _store_frozen(module: nn.Module, name: str, w: torch.Tensor, base_dtype: str) -> None:
    """Register the frozen weight ``w [..., out, in]`` on ``module`` under ``name`` in ``base_dtype``
    (``int8``: ``name`` int8 plus ``name + "_scale" [..., out]`` fp32, per output channel)."""
    w = w.detach()
    if base_dtype == "bf16":
        module.register_buffer(name, w.to(torch.bfloat16))
    elif base_dtype == "int8":
        q, scale = quantize_int8(w.reshape(-1, w.shape[-1]))       # rows = every output channel
        module.register_buffer(name, q.view(w.shape))
        module.register_buffer(name + "_scale", scale.view(w.shape[:-1]))
    else:
        raise LoRAError(f"base dtype {base_dtype!r}: one of {BASE_DTYPES}")


def _frozen_weight(module: nn.Module, name: str, base_dtype: str, index: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` base weight ``name`` (expert ``index`` of a stacked one) in ``dtype``."""
    w = getattr(module, name)
    if index is not None:
        w = w[index]
    if base_dtype == "int8":
        s = getattr(module, name + "_scale")
        return dequantize_int8(w, s if index is None else s[index], dtype)
    return w.to(dtype)


def _check_base_dtype(base_dtype: str) -> str:
    if base_dtype not in BASE_DTYPES:
        raise LoRAError(f"LoRA base dtype {base_dtype!r}: one of {', '.join(BASE_DTYPES)}")
    return base_dtype


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise LoRAError(f"LoRA alpha must be > 0, got {alpha!r}")


def _init_a_(a: torch.Tensor) -> torch.Tensor:
    """PEFT's default init of ``A`` (that of ``nn.Linear``: kaiming-uniform with a = sqrt(5)), per
    ``[r, in]`` slice of a stacked ``[E, r, in]`` tensor."""
    for sl in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(sl, a=math.sqrt(5))
    return a


# ------------------------------------------------------------------------------- the layers
class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; see the module docstring.

    ``base_dtype="fp32"`` keeps the replaced ``nn.Linear``'s own ``weight`` / ``bias`` Parameters (by
    reference, frozen); ``bf16`` / ``int8`` store a compact copy as buffers. Only ``lora_A [r, in]`` and
    ``lora_B [out, r]`` require gradients.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, base_dtype: str = "fp32"):
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.base_dtype = _check_base_dtype(base_dtype)
        self.in_features, self.out_features = base.in_features, base.out_features
        if base_dtype == "fp32":
            adopt_tensors(self, base)
            self.weight.requires_grad_(False)
            if "bias" not in self._parameters:             # a bias-free Linear holds bias = None
                self.register_parameter("bias", None)
        else:
            _store_frozen(self, "weight", base.weight, base_dtype)
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
            self.training = base.training
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        self.lora_A = nn.Parameter(_init_a_(torch.empty(rank, self.in_features, device=w.device, dtype=torch.float32)))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen base weight ``[out, in]`` as a dense ``dtype`` tensor."""
        return _frozen_weight(self, "weight", self.base_dtype, None, dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A`` ``[out, in]`` fp32: what the adapter adds to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.base_dtype == "fp32":
            y = F.linear(x, self.weight, self.bias)
        else:
            y = _FrozenMatmul.apply(x, self.base_weight)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.T @ b.T) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scale * B A`` (summed in fp32) and the base bias; in the base's
        dtype for an ``fp32`` (as-loaded) base, fp32 for a compact one."""
        dtype = self.weight.dtype if self.base_dtype == "fp32" else torch.float32
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.lora_A.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.base_weight(torch.float32) + self.delta_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias.float())
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, base={self.base_dtype}")


class LoRAExperts(nn.Module):
    """Stacked routed experts (:class:`~dsv3.model.moe.RoutedExperts`'s contract) with a LoRA pair per
    expert and projection: ``{proj}_lora_A [E, r, in]``, ``{proj}_lora_B [E, out, r]``.

    ``base_dtype="fp32"`` keeps the replaced module's stacked Parameters (frozen, by reference);
    ``bf16`` / ``int8`` hold compact copies as buffers (int8: plus ``{proj}_scale [E, out]``).
    """

    def __init__(self, experts: RoutedExperts, rank: int, alpha: float, dropout: float = 0.0,
                 base_dtype: str = "fp32"):
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.base_dtype = _check_base_dtype(base_dtype)
        self.n_experts = experts.gate_proj.shape[0]
        if base_dtype == "fp32":
            adopt_tensors(self, experts)
            for p in EXPERT_PROJS:
                getattr(self, p).requires_grad_(False)
        else:
            for p in EXPERT_PROJS:
                _store_frozen(self, p, getattr(experts, p), base_dtype)
            self.training = experts.training
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        for p in EXPERT_PROJS:
            E, out, inp = getattr(experts, p).shape
            dev = getattr(experts, p).device
            self.register_parameter(p + "_lora_A", nn.Parameter(_init_a_(torch.empty(E, rank, inp, device=dev))))
            self.register_parameter(p + "_lora_B", nn.Parameter(torch.zeros(E, out, rank, device=dev)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def base_weight(self, proj: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``e``'s frozen ``proj`` weight ``[out, in]`` as a dense ``dtype`` tensor."""
        return _frozen_weight(self, proj, self.base_dtype, e, dtype)

    def delta_weight(self, proj: str) -> torch.Tensor:
        """``scale * B_e A_e`` for every expert: ``[E, out, in]`` fp32."""
        return torch.bmm(getattr(self, proj + "_lora_B"), getattr(self, proj + "_lora_A")) * self.scaling

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] -> sum_k weight * expert_k(x)  [T, D] (the reference expert loop)."""
        # unbind once: per-expert views whose backward stacks the E gradients once (see model/moe.py)
        lora = {p: (getattr(self, p + "_lora_A").unbind(0), getattr(self, p + "_lora_B").unbind(0))
                for p in EXPERT_PROJS}
        base = ({p: getattr(self, p).unbind(0) for p in EXPERT_PROJS} if self.base_dtype == "fp32" else None)

        def proj(h: torch.Tensor, p: str, e: int) -> torch.Tensor:         # [n, in] -> [n, out]
            if base is not None:
                y = h @ base[p][e].T
            else:
                y = _FrozenMatmul.apply(h, lambda dtype: self.base_weight(p, e, dtype))
            a, b = lora[p][0][e].to(h.dtype), lora[p][1][e].to(h.dtype)
            return y + (self.dropout(h) @ a.T @ b.T) * self.scaling

        def expert(chunk: torch.Tensor, route_w: torch.Tensor, e: int) -> torch.Tensor:
            h = F.silu(proj(chunk, "gate_proj", e)) * proj(chunk, "up_proj", e)   # [n, I]
            return proj(h * route_w.to(h.dtype), "down_proj", e)                   # [n, D]

        return dispatch_experts(x, weights, topk, range(self.n_experts), expert)

    def merged(self) -> RoutedExperts:
        """Plain :class:`RoutedExperts` with every expert's ``W + scale * B A`` (summed in fp32; dtype as
        :meth:`LoRALinear.merged`)."""
        E, inter, hidden = self.gate_proj_lora_B.shape[0], self.gate_proj_lora_B.shape[1], self.gate_proj_lora_A.shape[2]
        dtype = self.gate_proj.dtype if self.base_dtype == "fp32" else torch.float32
        out = RoutedExperts(E, hidden, inter).to(device=self.gate_proj_lora_A.device, dtype=dtype)
        with torch.no_grad():
            for p in EXPERT_PROJS:
                w = torch.stack([self.base_weight(p, e) for e in range(E)])
                getattr(out, p).copy_(w + self.delta_weight(p))
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, rank={self.rank}, alpha={self.alpha:g}, base={self.base_dtype}"


LORA_MODULES = (LoRALinear, LoRAExperts)


# ------------------------------------------------------------------------------- applying
def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """``"q,kv,o"`` (or a sequence of names) -> the validated target names, in :data:`TARGETS` order."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not names:
        raise LoRAError(f"no LoRA targets given; choose from {', '.join(TARGETS)}")
    bad = sorted(set(names) - set(TARGETS))
    if bad:
        raise LoRAError(f"unknown LoRA target(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


def parse_modules_to_save(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"embed,head"`` (or a sequence, or ``""`` / ``None`` for none) -> validated names of
    :data:`SAVE_MODULES`, in its order."""
    if names is None:
        return ()
    names = [t.strip() for t in (names.split(",") if isinstance(names, str) else names) if t.strip()]
    bad = sorted(set(names) - set(SAVE_MODULES))
    if bad:
        raise LoRAError(f"unknown LoRA modules to save {', '.join(bad)}; choose from {', '.join(SAVE_MODULES)}")
    return tuple(t for t in SAVE_MODULES if t in names)


def saved_modules(model: nn.Module) -> tuple[str, ...]:
    """The :data:`SAVE_MODULES` names ``model``'s LoRA run trains whole (``()`` for none)."""
    return tuple(getattr(model, SAVED_ATTR, ()))


def lora_targets(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of the main layers that ``targets`` select (MTP excluded)."""
    targets = parse_targets(targets)
    attn = {n for t in targets if t in ATTENTION_TARGETS for n in ATTENTION_TARGETS[t]}
    found = []
    for name, module in model.named_modules():
        if not name.startswith("layers."):
            continue
        if isinstance(module, MLA):
            found += [(f"{name}.{child}", getattr(module, child)) for child in sorted(attn) if hasattr(module, child)]
        elif isinstance(module, MoE):
            if "shared" in targets and isinstance(module.shared_experts, MLP):
                found += [(f"{name}.shared_experts.{p}", getattr(module.shared_experts, p)) for p in EXPERT_PROJS]
            if "experts" in targets and isinstance(module.experts, RoutedExperts):
                found.append((f"{name}.experts", module.experts))
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str | Iterable[str] = DEFAULT_TARGETS,
               base_dtype: str = "fp32", dropout: float = 0.0,
               modules_to_save: str | Iterable[str] | None = None) -> list[str]:
    """Replace the targeted modules of ``model`` by LoRA layers and freeze everything else.

    rank: ``r``; alpha: scale numerator (default ``2 r``; the update is scaled by ``alpha / r``);
    targets: names from :data:`TARGETS` (a comma-separated string or a sequence); base_dtype: how the
    frozen base weights of the replaced modules are stored (``fp32``: as they are, by reference;
    ``bf16``; ``int8`` per output channel); dropout: on the adapter's input; modules_to_save: names
    from :data:`SAVE_MODULES` (``"embed,head"``) whose whole weight stays trainable and is saved in the
    adapter. Returns the replaced names.
    The adapters are created on the base weights' device, their values drawn from torch's global RNG.
    """
    alpha = 2.0 * rank if alpha is None else alpha
    _check_rank_alpha(rank, alpha)
    _check_base_dtype(base_dtype)
    save = parse_modules_to_save(modules_to_save)
    if save and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # one tensor for both: PEFT would copy it into two wrappers that then diverge
        raise LoRAError("LoRA modules to save (embed, head) on a model with tied embeddings are not supported")
    if any(isinstance(m, LORA_MODULES) for m in model.modules()):
        raise LoRAError("the model already has LoRA layers (merge or reload it first)")
    found = lora_targets(model, targets)
    if not found:
        raise LoRAError(f"LoRA targets {','.join(parse_targets(targets))} select no module of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in found:
        if isinstance(module, RoutedExperts):
            new = LoRAExperts(module, rank, alpha, dropout, base_dtype)
        elif isinstance(module, nn.Linear):
            new = LoRALinear(module, rank, alpha, dropout, base_dtype)
        else:
            raise LoRAError(f"{name}: a {type(module).__name__}, not a Linear or routed experts (already replaced?)")
        replace_module(model, name, new)
    for s in save:
        getattr(model, SAVE_MODULES[s]).weight.requires_grad_(True)
    setattr(model, SAVED_ATTR, save)
    return [n for n, _ in found]


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every LoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_MODULES)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable Parameters (what an optimizer of a LoRA run gets): the low-rank pairs,
    then the weights of the modules saved whole (:func:`saved_modules`)."""
    pairs = [p for _, m in lora_modules(model) for n, p in m.named_parameters(recurse=False) if "lora_" in n]
    return pairs + [getattr(model, SAVE_MODULES[s]).weight for s in saved_modules(model)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base (``W + scale * B A``, fp32) and put plain ``nn.Linear`` /
    :class:`RoutedExperts` back in place; the model's other parameters become trainable again. Returns ``model``."""
    for name, module in lora_modules(model):
        replace_module(model, name, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, SAVED_ATTR):   # the saved modules were trained in place: nothing to fold
        delattr(model, SAVED_ATTR)
    return model


def merge_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``model`` with the adapter in ``path`` folded into its weights (:func:`load_adapter`, then
    :func:`merge_lora`): a plain model again, for inference engines and exports. Returns ``model``."""
    return merge_lora(load_adapter(model, path))


# ------------------------------------------------------------------------------- PEFT layout
def _hf_module(model: nn.Module, param_name: str, shape: tuple[int, ...]) -> list[str]:
    """Checkpoint module name(s) of one of our weights (one per expert for stacked experts)."""
    return [hf.removesuffix(".weight") for hf, _ in hf_names(param_name, shape, model.config)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in PEFT's names: ``base_model.model.<checkpoint module>.lora_A.weight`` ``[r, in]``
    and ``.lora_B.weight`` ``[out, r]``, one pair per Linear of the HF checkpoint (routed experts: per
    expert, ``...mlp.experts.N.gate_proj``), then the modules saved whole under their checkpoint names
    (``base_model.model.model.embed_tokens.weight``, ``base_model.model.lm_head.weight``: PEFT's saved
    form, without its ``modules_to_save.default`` infix). The tensors are detached views of the live
    Parameters."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoRALinear):
            hf = _hf_module(model, name + ".weight", (m.out_features, m.in_features))[0]
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach()
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = m.lora_B.detach()
        else:
            for p in EXPERT_PROJS:
                a, b = getattr(m, p + "_lora_A").detach(), getattr(m, p + "_lora_B").detach()
                for e, hf in enumerate(_hf_module(model, f"{name}.{p}", (m.n_experts,))):
                    out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a[e]
                    out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b[e]
    for s in saved_modules(model):
        w = getattr(model, SAVE_MODULES[s]).weight
        out[f"{PEFT_PREFIX}{_hf_module(model, SAVE_MODULES[s] + '.weight', tuple(w.shape))[0]}.weight"] = w.detach()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """The ``adapter_config.json`` PEFT reads for ``model``'s adapters (a LoRA for causal LM).

    ``target_modules`` is a regex over the transformers module names that matches exactly the
    adapted attention and routed-expert modules (a list of leaf names would also catch, e.g., the
    dense layers' ``gate_proj``). The shared experts go in ``target_parameters`` (their weights, by
    full name) instead: PEFT on transformers v5 re-routes every ``gate_proj`` / ``up_proj`` /
    ``down_proj`` *module* target to the fused routed experts, and would drop them. Both forms read
    the same ``...lora_A.weight`` / ``lora_B.weight`` keys. ``modules_to_save`` lists the transformers
    leaf names of the modules saved whole. The other fields are PEFT's defaults.
    """
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA layers")
    first = mods[0][1]
    if any(m.rank != first.rank or m.alpha != first.alpha for _, m in mods):
        raise LoRAError("the adapters differ in rank or alpha; PEFT's layout holds one of each")
    hf = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in lora_state_dict(model) if ".lora_" in k})
    # PEFT matches modules_to_save entries against the end of each module name
    to_save = [SAVE_MODULES[s] for s in saved_modules(model)] or None
    shared = [h + ".weight" for h in hf if ".shared_experts." in h]
    rest = [h for h in hf if ".shared_experts." not in h]
    regex = None
    if rest:  # model.layers.<i>.<self_attn\.q_a_proj | mlp\.experts\.(\d+\.)?gate_proj | ...>
        layers = sorted({int(h.split(".")[2]) for h in rest})
        leaves = sorted({_leaf_pattern(".".join(h.split(".")[3:])) for h in rest})
        regex = r"model\.layers\.(" + "|".join(str(i) for i in layers) + r")\.(" + "|".join(leaves) + r")"
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": regex if regex is not None else [], "exclude_modules": None,
        "target_parameters": shared or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": to_save, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def _leaf_pattern(leaf: str) -> str:
    """``mlp.experts.3.gate_proj`` -> ``mlp\\.experts\\.(\\d+\\.)?gate_proj``; other names with escaped dots."""
    # The expert index is optional: PEFT (on transformers v5, whose experts are fused) probes the
    # pattern with "...mlp.experts.gate_proj" to find the per-expert targets it converts.
    return "\\.".join(p for p in leaf.split(".") if not p.isdigit()).replace("mlp\\.experts\\.", "mlp\\.experts\\.(\\d+\\.)?")


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s adapters to directory ``path`` in PEFT's layout (``adapter_config.json``,
    ``adapter_model.safetensors``, fp32); ``base_model``: the base checkpoint it belongs to (recorded as
    ``base_model_name_or_path``); ``metadata``: extra safetensors header strings. Returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model)
    tensors = {k: v.float().contiguous().clone() for k, v in lora_state_dict(model).items()}
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """``adapter_config.json`` of adapter directory ``path`` (checked to be a LoRA one)."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise LoRAError(f"{path}: no {ADAPTER_CONFIG} there (not a LoRA adapter directory)")
    cfg = json.loads(f.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{f}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are supported")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoRAError(f"{f}: DoRA / rsLoRA / per-module rank or alpha patterns are not supported")
    return cfg


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter (config and weights)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


def load_adapter(model: nn.Module, path: str | os.PathLike, base_dtype: str | None = None) -> nn.Module:
    """Load the adapter in ``path`` (PEFT layout, e.g. written by :func:`save_adapter`) into ``model``.

    A model without LoRA layers gets them first (:func:`apply_lora` with the adapter's rank, alpha and
    the modules its weights name, the modules saved whole its config's ``modules_to_save`` names,
    the base stored as ``base_dtype``, default fp32); a model that has them must have exactly the
    adapter's modules. Every tensor must find its place and shape
    (a :class:`LoRAError` names the first that doesn't). Returns ``model``.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise LoRAError(f"{path}: no {ADAPTER_WEIGHTS} there")
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    if not lora_modules(model):
        apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), _targets_from_keys(saved), base_dtype or "fp32",
                   float(cfg.get("lora_dropout") or 0), _saved_from_config(cfg, path))
    live = lora_state_dict(model)
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise LoRAError(f"{path}: the adapter does not fit the model: "
                        + (f"{len(missing)} tensor(s) missing (e.g. {missing[0]}) " if missing else "")
                        + (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""))
    with torch.no_grad():
        for k, t in live.items():
            if tuple(saved[k].shape) != tuple(t.shape):
                raise LoRAError(f"{path}: {k} has shape {tuple(saved[k].shape)}, the model's adapter {tuple(t.shape)}")
            t.copy_(saved[k])   # a view of the Parameter: writes into it
    return model


def _saved_from_config(cfg: dict, path: Path) -> tuple[str, ...]:
    """Our :data:`SAVE_MODULES` names for an adapter config's ``modules_to_save`` (transformers leaf names)."""
    ours = {leaf: s for s, leaf in SAVE_MODULES.items()}
    names = cfg.get("modules_to_save") or []
    bad = [n for n in names if n not in ours]
    if bad:
        raise LoRAError(f"{path}: modules_to_save {bad} not supported; dsv3 saves {', '.join(ours)}")
    return parse_modules_to_save([ours[n] for n in names])


def _targets_from_keys(saved: dict[str, torch.Tensor]) -> list[str]:
    """Our target names for an adapter written elsewhere (by PEFT), from the modules its keys name
    (the modules saved whole, keys without ``.lora_``, come from the config instead)."""
    out = set()
    for k in saved:
        if ".lora_" not in k:
            continue
        leaf = k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]
        if ".mlp.experts." in k:
            out.add("experts")
        elif ".shared_experts." in k:
            out.add("shared")
        else:
            hits = [t for t, names in ATTENTION_TARGETS.items() if leaf in names]
            if not hits:
                raise LoRAError(f"adapter tensor {k}: not a module dsv3 adapts ({', '.join(TARGETS)})")
            out.update(hits)
    return sorted(out)
