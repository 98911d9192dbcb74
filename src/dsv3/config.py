"""Model configuration with the Hugging Face ``config.json`` field names, validation and presets.

``ModelConfig`` is the one description of a model's shape. It reads and writes the ``config.json``
of the official DeepSeek-V2/V3 checkpoints (``rope_scaling`` + ``rope_theta``) and of checkpoints
written by ``transformers`` 5.x (``rope_parameters``), and checks every rule the model relies on,
naming the field and the rule when one is broken.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config field breaks a rule; the message names the field and the rule."""


class DeploymentWarning(UserWarning):
    """A valid shape that a deployment engine (vLLM, SGLang) will refuse to serve."""


SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# When YaRN is switched on: "always" is how transformers reads a config; "past_original" is the
# official DeepSeek demo, which only uses YaRN when the run's context exceeds the original length.
YARN_MODES = ("always", "past_original")

# The only latent the deployment engines' MLA kernels take: vLLM and SGLang run MLA through FlashMLA
# (GPU) and CPU_MLA / AMX_MLA (CPU), all written for DeepSeek-V2/V3's 512 + 64 = 576 values per token.
# Any other width is refused at load ("Head dimension 80 is not supported by MLA").
SERVABLE_KV_LORA_RANK = 512
SERVABLE_QK_ROPE_HEAD_DIM = 64


@dataclass
class ModelConfig:
    """Shape of a DeepSeek-V3 / V2 model. Field names follow the HF ``config.json``."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str | None = "bfloat16"
    quantization_config: dict | None = None
    yarn_mode: str = "always"
    # Fields of config.json we don't interpret, kept so that a load/save round trip loses nothing.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by MLA: normalized ``c_kv`` plus the rotated ``k_pe``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def servable_latent(self) -> bool:
        """Whether vLLM's and SGLang's MLA kernels can serve this shape (``kv_lora_rank`` 512,
        ``qk_rope_head_dim`` 64, the V2/V3 latent). dsv3's own engine and training take any width."""
        return self.kv_lora_rank == SERVABLE_KV_LORA_RANK and self.qk_rope_head_dim == SERVABLE_QK_ROPE_HEAD_DIM

    def deployment_warnings(self) -> list[str]:
        """What keeps deployment engines from serving this shape; empty when nothing does."""
        if self.servable_latent:
            return []
        return [f"kv_lora_rank={self.kv_lora_rank} + qk_rope_head_dim={self.qk_rope_head_dim} (latent "
                f"{self.latent_dim}): vLLM and SGLang serve MLA only through kernels built for "
                f"kv_lora_rank={SERVABLE_KV_LORA_RANK} + qk_rope_head_dim={SERVABLE_QK_ROPE_HEAD_DIM} "
                f"(latent {SERVABLE_KV_LORA_RANK + SERVABLE_QK_ROPE_HEAD_DIM}; FlashMLA on GPU, CPU_MLA/AMX_MLA "
                "on CPU) and will refuse this model; dsv3's own engine runs it"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from ``first_k_dense_replace`` on (every ``moe_layer_freq``-th) use DeepSeekMoE."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters, or None when RoPE is unscaled."""
        rs = self.rope_scaling
        if not rs:
            return None
        return rs if _rope_type(rs) == "yarn" else None

    def yarn_active(self, max_seq_len: int | None = None) -> bool:
        """Whether YaRN frequencies are used for a run whose context is ``max_seq_len`` tokens."""
        y = self.yarn
        if y is None:
            return False
        if self.yarn_mode == "always":
            return True
        length = max_seq_len if max_seq_len is not None else self.max_position_embeddings
        return length > int(y["original_max_position_embeddings"])

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that breaks a rule."""

        def need(cond: bool, name: str, rule: str) -> None:
            if not cond:
                raise ConfigError(f"{name}={getattr(self, name, None)!r}: {rule}")

        need(self.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
                     "num_nextn_predict_layers", "intermediate_size", "moe_intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             f"must equal num_attention_heads={self.num_attention_heads} (MLA has one latent shared by all heads)")
        need(self.q_lora_rank is None or (_is_int(self.q_lora_rank) and self.q_lora_rank >= 0),
             "q_lora_rank", "must be null or a non-negative integer")
        need(_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0, "rms_norm_eps", "must be a number > 0")
        need(_is_number(self.rope_theta) and self.rope_theta > 1, "rope_theta", "must be a number > 1")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU) is supported")
        need(_is_int(self.moe_layer_freq) and self.moe_layer_freq >= 1, "moe_layer_freq", "must be an integer >= 1")
        need(self.yarn_mode in YARN_MODES, "yarn_mode", f"must be one of {YARN_MODES}")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            need(self.intermediate_size > 0, "intermediate_size", "must be > 0 when there are dense layers")
        if self.n_routed_experts > 0:
            self._validate_router(need)
        if self.rope_scaling:
            self._validate_rope_scaling()

    def _validate_router(self, need) -> None:
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"unknown scoring function; must be one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0 with routed experts")
        need(isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= self.n_routed_experts,
             "num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        need(isinstance(self.n_group, int) and self.n_group >= 1, "n_group", "must be >= 1")
        need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
             f"must be divisible by n_group={self.n_group}")
        need(isinstance(self.topk_group, int) and 1 <= self.topk_group, "topk_group", "must be >= 1")
        need(self.topk_group <= self.n_group, "topk_group", f"must be <= n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method == "noaux_tc":
            need(self.scoring_func == "sigmoid", "scoring_func",
                 "topk_method 'noaux_tc' (DeepSeek-V3) needs scoring_func 'sigmoid'")
            need(per_group >= 2 or self.n_group == 1, "n_group",
                 f"noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts (has {per_group})")
        if self.topk_method in ("noaux_tc", "group_limited_greedy"):
            need(self.topk_group * per_group >= self.num_experts_per_tok, "num_experts_per_tok",
                 f"kept groups hold topk_group*experts_per_group={self.topk_group * per_group} experts, "
                 f"fewer than num_experts_per_tok={self.num_experts_per_tok}")
        need(_is_number(self.routed_scaling_factor) and self.routed_scaling_factor > 0, "routed_scaling_factor",
             "must be a number > 0")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling={rs!r}: must be an object")
        kind = _rope_type(rs)
        if kind not in ("yarn", "default", None):
            raise ConfigError(f"rope_scaling.type={kind!r}: only 'yarn' is supported")
        if kind == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if rs.get(key) is None:
                    raise ConfigError(f"rope_scaling.{key}: required for YaRN")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "attention_factor"):
                if rs.get(key) is not None and not _is_number(rs[key]):
                    raise ConfigError(f"rope_scaling.{key}={rs[key]!r}: must be a number")
            if not float(rs["factor"]) >= 1.0:
                raise ConfigError(f"rope_scaling.factor={rs['factor']!r}: must be >= 1")
            if not int(rs["original_max_position_embeddings"]) > 0:
                raise ConfigError("rope_scaling.original_max_position_embeddings: must be > 0")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a ``config.json`` dict (official DeepSeek layout or transformers 5.x layout)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={model_type!r}: must be one of {MODEL_TYPES}")
        # transformers 5 folds rope_theta + rope_scaling into rope_parameters.
        rp = d.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"rope_parameters={rp!r}: must be an object")
        if rp and "rope_scaling" not in d:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if _rope_type(rp) not in (None, "default"):
                d["rope_scaling"] = rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if model_type == "deepseek_v2":
            # V2 defaults differ from V3; fill the ones a V2 config.json may leave out.
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("n_group", 1)
            d.setdefault("topk_group", 1)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in d.items():
            (kwargs if k in names else extra)[k] = v
        # Derived from other fields; to_hf writes them back (architectures from model_type).
        for derived in ("head_dim", "qk_head_dim", "architectures"):
            extra.pop(derived, None)
        # An explicit null means "none" for these (V2 configs write n_group: null etc.).
        for key, none_value in (("n_group", 1), ("topk_group", 1), ("n_routed_experts", 0), ("n_shared_experts", 0)):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = none_value
        for k in ("rope_scaling",):
            if isinstance(kwargs.get(k), dict):
                kwargs[k] = _normalize_rope_scaling(kwargs[k])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:  # a field of the wrong kind, e.g. a string where a number belongs
            raise ConfigError(f"config.json: {e}") from e

    def to_hf(self) -> dict:
        """The ``config.json`` dict, in the official DeepSeek layout (readable by transformers 5.x)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(copy.deepcopy(self.extra))
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        if d["quantization_config"] is None:
            del d["quantization_config"]
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rs.setdefault("type", _rope_type(rs))
            rs.setdefault("rope_type", _rope_type(rs))
            d["rope_scaling"] = rs
        d["num_key_value_heads"] = self.num_attention_heads
        return dict(sorted(d.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``config.json`` (or the directory holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf(d)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rope_type(rs: dict) -> str | None:
    return rs.get("rope_type", rs.get("type"))


def _normalize_rope_scaling(rs: dict) -> dict:
    rs = dict(rs)
    kind = _rope_type(rs)
    if kind is not None:
        rs["type"] = kind
        rs["rope_type"] = kind
    return rs


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- presets
_V3_YARN = {"type": "yarn", "rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _preset_v3() -> ModelConfig:
    return ModelConfig(rope_scaling=dict(_V3_YARN))


def _preset_v2_lite() -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_nextn_predict_layers=0, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        norm_topk_prob=False, scoring_func="softmax", max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001,
    )


# The presets users train (tiny, small) keep the V2/V3 latent (kv_lora_rank 512 + qk_rope_head_dim 64)
# so that vLLM and SGLang can serve what they produce; everything else is scaled down.
def _preset_small() -> ModelConfig:
    # ~0.5B total / ~0.13B active: the shape for a single-GPU run.
    return ModelConfig(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256,
        num_hidden_layers=12, num_nextn_predict_layers=1, num_attention_heads=12, num_key_value_heads=12,
        n_shared_experts=1, n_routed_experts=64, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=384,
        qk_rope_head_dim=64, v_head_dim=64, qk_nope_head_dim=64, n_group=8, topk_group=4,
        num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=4096, rope_scaling=None,
    )


def _preset_tiny() -> ModelConfig:
    # ~11M params: trains on a laptop CPU in minutes. Keeps every V3 feature (q-LoRA, group routing,
    # shared expert, dense first layer, one MTP module). The latent (576) is wider than the hidden size
    # (256), so it compresses nothing here; it is the width the deployment kernels take.
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=96,
        qk_rope_head_dim=64, v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2,
        num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=None,
        torch_dtype="float32",
    )


def _preset_tiny_deep() -> ModelConfig:
    # Deep and narrow (~7M params, 16 layers of hidden 128) for MTP speculative decoding: the MTP
    # module is one block out of 17, so drafting (that block, eh_proj and the shared head) costs a
    # small share of a decode step, the regime of the paper's 61-layer model (dsv3 experiment mtp).
    return ModelConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=16, num_nextn_predict_layers=1, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=64,
        qk_rope_head_dim=64, v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024, rope_scaling=None,
        torch_dtype="float32",
    )


PRESETS = {
    "tiny": _preset_tiny,
    "tiny-deep": _preset_tiny_deep,
    "small": _preset_small,
    "v2-lite": _preset_v2_lite,
    "v3": _preset_v3,
}


def preset(name: str) -> ModelConfig:
    """A named preset: ``tiny``, ``tiny-deep`` (16 narrow layers, for MTP), ``small``, ``v2-lite`` (16B) or
    ``v3`` (671B)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
