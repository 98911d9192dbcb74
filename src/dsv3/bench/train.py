"""``dsv3 bench train``: tokens/s of one full training step, ours against ``transformers``, in one run.

A step is forward + next-token cross-entropy + backward + ``AdamW.step`` + ``zero_grad``, in the
precision ``dtype`` names (:mod:`dsv3.train.precision`: bf16 autocast with fp32 master weights, or
fp32; ``auto`` = bf16 where the device has bf16 units) for every implementation alike; in bf16 ours
is also timed in fp32 (``dsv3[fp32]``), so one run gives our bf16 step against our fp32 step and
against transformers' bf16 step. Every line uses the same optimizer (torch's fused AdamW), so a
ratio is the model's, not the optimizer's. Both models
get the same config (MTP off: transformers has none), the same weights (ours is written with
:func:`dsv3.save_pretrained` and read back by ``DeepseekV3ForCausalLM.from_pretrained``), the same
token batch, the same ``torch.set_num_threads``, the same optimizer settings and the same loss code.
The steps are interleaved (the implementations take turns, in an order that rotates every round), so
load from other processes on the machine hits all of them alike. The first-step losses must agree
(same model), and the JSON records how closely.

Optionally (``torchtitan=True``) torchtitan's DeepSeek-V3 model takes its turns too, on the same shape
and batch; torchtitan is never a dependency of this project, so its absence or failure is recorded,
not raised.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..config import preset as get_preset
from ..model import Transformer
from ..train.precision import autocast, train_dtype
from .machine import machine_info, resolve_device, sync, torch_threads

LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 0.1
MTP_WEIGHT = 0.3          # lambda of the MTP loss (DESIGN.md §2), for the optional MTP line
LOSS_TOL = 1e-4           # first-step losses of two implementations of the same model must agree to this
# Under bf16 autocast the two round differently (op order, fused kernels): about 3e-4 seen on an H100
# at loss 10.5 ('small'); a different model would differ by far more.
LOSS_TOL_AUTOCAST = 2e-3
# Two copies, each with grads and two AdamW moments (16 bytes/param in fp32): 'small' (0.5B) needs ~16 GB;
# the 16B and 671B presets are refused.
MAX_PARAMS = 1_000_000_000


# ------------------------------------------------------------------------------------- helpers
def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, S, V]`` against ``targets [B, S]``.

    The batch holds ``S + 1`` tokens per row: the model reads the first ``S`` and every one of its
    ``S`` logits is scored, so no slice of the (large) logits is taken, and none is copied back in
    the backward pass.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _fused_adamw(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


class Runner:
    """One implementation under test: a model, its optimizer and ``loss_fn(window) -> scalar loss``.

    ``window [B, S+1]``: the model reads ``window[:, :-1]`` and predicts ``window[:, 1:]``.
    """

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device, info: dict | None = None, dtype: str = "fp32"):
        self.name, self.model, self.loss_fn, self.device = name, model, loss_fn, device
        self.dtype = dtype                    # "bf16" (autocast) or "fp32", as the trainer's --dtype
        self.info = {"dtype": dtype, **(info or {})}
        model.train()
        # torch's fused AdamW (one kernel over all tensors) on CPU and CUDA, its fastest; same for every runner.
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                     fused=_fused_adamw(device))
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, window: torch.Tensor) -> float:
        """One full training step; returns its wall time in seconds (and records the loss)."""
        sync(self.device)
        t0 = time.perf_counter()
        with autocast(self.device, self.dtype):
            loss = self.loss_fn(window)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()          # also waits for the device
        sync(self.device)
        dt = time.perf_counter() - t0
        self.losses.append(value)
        return dt

    def summary(self, tokens_per_step: int) -> dict:
        med = statistics.median(self.times)
        return {
            "name": self.name,
            **self.info,
            "params": sum(p.numel() for p in self.model.parameters()),
            "step_s_median": med,
            "step_s_mean": statistics.fmean(self.times),
            "step_s_min": min(self.times),
            "step_s_all": self.times,
            "tokens_per_s": tokens_per_step / med,
            "tokens_per_s_mean": tokens_per_step / statistics.fmean(self.times),
            "first_loss": self.losses[0],
            "losses": self.losses,
        }


def run_interleaved(runners: list[Runner], window: torch.Tensor, steps: int, warmup: int) -> None:
    """``warmup`` untimed then ``steps`` timed steps of every runner, taking turns step by step.

    The order of the runners rotates every round, so none is always the one right after another
    (caches, allocator state) and slow phases of a noisy machine fall on all of them.
    """
    for r in range(warmup + steps):
        k = r % len(runners)
        for runner in runners[k:] + runners[:k]:
            dt = runner.step(window)
            if r >= warmup:
                runner.times.append(dt)


# ------------------------------------------------------------------------------------- builders
def _ours(config: ModelConfig, seq_len: int, seed: int, device: torch.device) -> Transformer:
    torch.manual_seed(seed)
    with device:
        return Transformer(config, max_seq_len=seq_len)


def _ours_runner(model: Transformer, device: torch.device, name: str = "dsv3", fused_ce: bool = True,
                 dtype: str = "fp32") -> Runner:
    """Ours with the trainer's own loss code (``compute_losses``): next-token CE (+ lambda * mean MTP CE),
    by default through the fused chunked head + cross-entropy as ``dsv3 train`` runs it. The balance
    losses are off: transformers has none, and the first-step losses must agree."""
    from ..train.trainer import TrainConfig, compute_losses
    cfg = TrainConfig(fused_ce=fused_ce, mtp_weight=MTP_WEIGHT, seq_aux_alpha=0.0, aux_loss_alpha=0.0)

    def loss_fn(window: torch.Tensor) -> torch.Tensor:
        return compute_losses(model, window, cfg)["loss"]

    from ..train.compile import is_compiled
    return Runner(name, model, loss_fn, device, {"mtp_depth": len(model.mtp), "fused_ce": fused_ce,
                                                 "compiled": is_compiled(model)}, dtype)


def _ours_copy(ours: Transformer, config: ModelConfig, seq_len: int, seed: int, device: torch.device) -> Transformer:
    """Another instance of ours holding ``ours``' weights (``config`` may add MTP modules, freshly initialized)."""
    model = _ours(config, seq_len, seed, device)
    model.load_state_dict(ours.state_dict(), strict=False)
    return model


def _transformers_runner(checkpoint_dir: str, attn: str, experts: str | None, device: torch.device,
                         dtype: str = "fp32") -> Runner:
    """``DeepseekV3ForCausalLM.from_pretrained`` on our checkpoint; ``experts=None``: its default kernel."""
    import transformers

    kwargs = {"attn_implementation": attn, "dtype": torch.float32}
    if experts is not None:
        kwargs["experts_implementation"] = experts
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()        # no "Loading weights" bar in the report
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.DeepseekV3ForCausalLM.from_pretrained(checkpoint_dir, **kwargs).to(device)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    used_experts = getattr(model.config, "_experts_implementation", None)
    name = f"transformers[{attn}" + (f",{used_experts}-experts]" if used_experts else "]")

    def loss_fn(window: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=window[:, :-1], use_cache=False).logits
        return next_token_loss(logits, window[:, 1:])

    return Runner(name, model, loss_fn, device,
                  {"attn_implementation": attn, "experts_implementation": used_experts,
                   "transformers": transformers.__version__}, dtype)


def parse_variant(text: str) -> tuple[str, str | None]:
    """``"sdpa"`` -> (sdpa, default experts); ``"eager/eager"`` -> attention eager, experts eager."""
    attn, _, experts = text.partition("/")
    return attn, (experts or None)


# ------------------------------------------------------------------------------------- the benchmark
def bench_train(preset: str = "tiny", batch_size: int = 8, seq_len: int = 256, steps: int = 5, warmup: int = 2,
                threads: int | None = None, seed: int = 0, mtp: bool = False, torchtitan: bool = False,
                transformers_variants: tuple[str, ...] | list[str] = ("sdpa",), config: ModelConfig | None = None,
                device: str | torch.device | None = None, plain_ce: bool = False, compile: bool = False,
                dtype: str = "auto") -> dict:
    """Time full training steps of ours and of transformers' DeepSeek-V3 on the same model and batch.

    ``config`` overrides ``preset`` (small test configs). ``transformers_variants``: ``ATTN[/EXPERTS]``
    strings, the first is the reference for ``ratio``; ``EXPERTS`` left out is transformers' default.
    ``mtp=True`` adds ours with the preset's MTP depth (not compared: transformers has no MTP).
    ``torchtitan=True`` tries torchtitan's DeepSeek-V3 too. Ours (the first result, the ``ratio``)
    computes its loss as ``dsv3 train`` does, with the fused chunked head + cross-entropy;
    ``plain_ce=True`` adds ours with full logits + ``F.cross_entropy`` (as transformers computes it),
    ``compile=True`` ours with :func:`dsv3.train.compile.compile_model` applied (compiled during
    the warmup steps, so use ``warmup >= 2``). Each extra line of ours holds the same weights and has
    its own ratio in ``ratios``. ``dtype`` (``auto``, ``bf16``, ``fp32``: the trainer's ``--dtype``)
    is every line's precision; in bf16, ``dsv3[fp32]`` (same weights, fp32) is added and
    ``ratio_bf16_vs_fp32`` is our bf16 tokens/s over it. Returns a JSON-ready dict.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    base = config if config is not None else get_preset(preset)
    name = "custom" if config is not None else preset
    cfg = base.replace(num_nextn_predict_layers=0)       # apples to apples: transformers has no MTP
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    from ..accounting import summary
    n_params = summary(cfg, seq_len=seq_len)["params"]["total"]
    if n_params > MAX_PARAMS:
        raise ValueError(f"{name} has {n_params / 1e9:.1f}B parameters; the benchmark holds two copies with "
                         f"AdamW state in memory (limit {MAX_PARAMS / 1e9:g}B): use a smaller preset")
    dev = resolve_device(device)
    amp = "bf16" if train_dtype(dtype, dev) == torch.bfloat16 else "fp32"
    with torch_threads(threads):
        return _bench_train(base, name, cfg, batch_size, seq_len, steps, warmup, seed, mtp, torchtitan,
                            transformers_variants, dev, plain_ce, compile, amp)


def _bench_train(base: ModelConfig, name: str, cfg: ModelConfig, batch_size: int, seq_len: int, steps: int,
                 warmup: int, seed: int, mtp: bool, torchtitan: bool, transformers_variants, dev: torch.device,
                 plain_ce: bool = False, compile: bool = False, amp: str = "fp32") -> dict:
    threads = torch.get_num_threads()

    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=gen).to(dev)
    tokens_per_step = batch_size * seq_len

    ours = _ours(cfg, seq_len, seed, dev)
    runners = [_ours_runner(ours, dev, dtype=amp)]
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-") as tmp:
        from ..checkpoint import save_pretrained
        save_pretrained(ours, tmp)
        for variant in transformers_variants:
            attn, experts = parse_variant(variant)
            try:
                runners.append(_transformers_runner(tmp, attn, experts, dev, amp))
            except Exception as e:  # noqa: BLE001 - a missing/broken peer is a result, not a crash
                errors[f"transformers[{variant}]"] = f"{type(e).__name__}: {_first_line(e)}"
    logit_check = _logit_check(runners, window[:, :-1])
    if amp == "bf16":  # our fp32 step on the same weights: what bf16 buys us
        runners.append(_ours_runner(_ours_copy(ours, cfg, seq_len, seed, dev), dev, "dsv3[fp32]", dtype="fp32"))
    if plain_ce:
        runners.append(_ours_runner(_ours_copy(ours, cfg, seq_len, seed, dev), dev, "dsv3[plain-ce]", fused_ce=False,
                                    dtype=amp))
    if compile:
        from ..train.compile import compile_model
        compiled = _ours_copy(ours, cfg, seq_len, seed, dev)
        compile_model(compiled)
        runners.append(_ours_runner(compiled, dev, "dsv3[compiled]", dtype=amp))
    if mtp:
        # Same main weights as the others, plus freshly initialized MTP modules (depth 1 if the preset has none).
        depth = base.num_nextn_predict_layers or 1
        with_mtp = _ours_copy(ours, cfg.replace(num_nextn_predict_layers=depth), seq_len, seed, dev)
        runners.append(_ours_runner(with_mtp, dev, name=f"dsv3+mtp{depth}", dtype=amp))
    titan, titan_info = torchtitan_runner(cfg, window, dev, amp) if torchtitan else (None, None)
    # torchtitan takes its turns among the others, so machine noise hits it alike.
    run_interleaved(runners + ([titan] if titan is not None else []), window, steps, warmup)

    results = [r.summary(tokens_per_step) for r in runners]
    out: dict = {
        "benchmark": "train_step",
        "preset": name,
        "config": cfg.to_hf(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "optimizer": {"name": "AdamW", "lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY,
                      "fused": _fused_adamw(dev)},
        "dtype": amp,
        "precision": "bf16 autocast" if amp == "bf16" else "fp32",
        "machine": machine_info(threads, dev),
        "results": results,
        "errors": errors,
        "logit_check": logit_check,
    }
    hf = [r for r in results if r["name"].startswith("transformers")]
    if hf:
        ref = hf[0]
        fastest = max(hf, key=lambda r: r["tokens_per_s"])
        delta = abs(results[0]["first_loss"] - ref["first_loss"])
        out["ratio"] = results[0]["tokens_per_s"] / ref["tokens_per_s"]
        out["ratio_vs_fastest_transformers"] = results[0]["tokens_per_s"] / fastest["tokens_per_s"]
        out["reference_transformers"] = ref["name"]
        out["fastest_transformers"] = fastest["name"]
        out["first_loss_ours"] = results[0]["first_loss"]
        out["first_loss_transformers"] = ref["first_loss"]
        out["first_loss_abs_diff"] = delta
        out["first_loss_tolerance"] = LOSS_TOL_AUTOCAST if amp == "bf16" else LOSS_TOL
        out["first_loss_match"] = delta <= out["first_loss_tolerance"]
        out["ratios"] = {r["name"]: r["tokens_per_s"] / ref["tokens_per_s"] for r in results
                         if r["name"].startswith("dsv3")}
        # Every line of ours without MTP is the same model as transformers': its first loss must agree too.
        out["first_loss_abs_diff_by_impl"] = {r["name"]: abs(r["first_loss"] - ref["first_loss"]) for r in results
                                              if r["name"].startswith("dsv3") and not r.get("mtp_depth")}
    by_name = {r["name"]: r for r in results}
    if "dsv3[fp32]" in by_name:
        out["ratio_bf16_vs_fp32"] = results[0]["tokens_per_s"] / by_name["dsv3[fp32]"]["tokens_per_s"]
    if titan_info is not None:
        if titan is not None:
            titan_info.update(titan.summary(tokens_per_step))
        out["torchtitan"] = titan_info
    return out


@torch.no_grad()
def _logit_check(runners: list[Runner], ids: torch.Tensor) -> dict:
    """Max |logits(ours) - logits(peer)| on the batch before training, absolute and relative to max |logits|."""
    ours = runners[0]
    ours.model.eval()
    ref = ours.model(ids[:2]).float()
    out = {}
    for r in runners[1:]:
        r.model.eval()
        got = r.model(input_ids=ids[:2], use_cache=False).logits.float()
        diff = (got - ref).abs().max().item()
        out[r.name] = {"max_abs_diff": diff, "max_rel_diff": diff / max(ref.abs().max().item(), 1e-30)}
        r.model.train()
    ours.model.train()
    return out


# ------------------------------------------------------------------------------------- torchtitan
# torchtitan's language models accept only these attention backends ("sdpa" is refused by its config
# builder for LMs: it cannot take per-document masks).
TORCHTITAN_BACKENDS = ("flex", "varlen")


def torchtitan_runner(cfg: ModelConfig, window: torch.Tensor, device: torch.device,
                      dtype: str = "fp32") -> tuple[Runner | None, dict]:
    """torchtitan's DeepSeek-V3 on the same shape, as a :class:`Runner` if it trains; never raises.

    Each of torchtitan's LM attention backends is tried for one training step (an untimed extra
    warmup step); the first that trains is returned. If none does, the model is built once more with
    torchtitan's own ``ScaledDotProductAttention`` (causal) as the inner attention -- a change its LM
    config refuses, so that result is labelled ``modified``. Weights are torchtitan's own random
    init (its layout differs from the checkpoint's), so its losses are not compared with ours.
    Returns ``(runner or None, info)``; ``info`` records the version and every attempt's error.
    """
    info: dict = {"runs": False, "attempts": []}
    try:
        from importlib.metadata import version
        import torchtitan  # noqa: F401
        info["version"] = version("torchtitan")
    except Exception as e:  # noqa: BLE001 - torchtitan is optional; record exactly what went wrong
        info["error"] = f"{type(e).__name__}: {_first_line(e)}"
        return None, info
    for backend in TORCHTITAN_BACKENDS + ("sdpa-swap",):
        attempt: dict = {"attn_backend": backend}
        info["attempts"].append(attempt)
        try:
            model, loss_fn = _torchtitan_model(cfg, window.shape[1] - 1, backend, device)
            runner = Runner(f"torchtitan[{backend}]", model, loss_fn, device, dtype=dtype)
            runner.step(window)            # does a training step run at all?
        except Exception as e:  # noqa: BLE001
            attempt["error"] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        attempt["runs"] = True
        runner.losses.clear()
        info.update(runs=True, attn_backend=backend, modified=backend == "sdpa-swap")
        return runner, info
    info["error"] = "; ".join(f"{a['attn_backend']}: {a['error']}" for a in info["attempts"])
    return None, info


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an error: its first line, cut after the first sentence when that line is long."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else ""
    if len(line) > limit:
        cut = line.find(". ", 40)
        line = line[: cut + 1] if 0 < cut < limit else line[:limit] + "..."
    return line


def _torchtitan_model(cfg: ModelConfig, seq_len: int, backend: str, device: torch.device):
    """torchtitan 0.3's ``DeepSeekV3Model`` with our config's shape; returns ``(model, loss_fn)``."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.deepseek_v3 import (_EMBEDDING_INIT, _NORM_INIT, DeepSeekV3Model, _build_dsv3_layers,
                                               _output_linear_init)

    if cfg.moe_layer_freq != 1:
        raise ValueError("torchtitan's DeepSeek-V3 has no moe_layer_freq")
    rope_kwargs = {}
    y = cfg.yarn
    if y is not None and cfg.yarn_active(seq_len):
        rope_kwargs = dict(scaling="yarn", rope_factor=float(y["factor"]), beta_fast=float(y.get("beta_fast") or 32),
                           beta_slow=float(y.get("beta_slow") or 1),
                           original_seq_len=int(y["original_max_position_embeddings"]))
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = _build_dsv3_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=D,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        mscale=float((y or {}).get("mscale_all_dim") or 1.0), dense_hidden_dim=cfg.intermediate_size,
        moe_hidden_dim=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts, router_top_k=cfg.num_experts_per_tok,
        router_score_func=cfg.scoring_func, router_num_expert_groups=cfg.n_group,
        router_num_limited_groups=cfg.topk_group, router_route_scale=cfg.routed_scaling_factor,
        router_route_norm=cfg.norm_topk_prob, attn_backend="flex" if backend == "sdpa-swap" else backend,
        moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=seq_len, theta=float(cfg.rope_theta),
                                **rope_kwargs))
    if backend == "sdpa-swap":
        from torchtitan.models.common.attention import ScaledDotProductAttention
        for layer in layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = DeepSeekV3Model.Config(
        vocab_size=V, dim=D,
        tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=D, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=D, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=D, out_features=V, param_init=_output_linear_init(D)),
        layers=layers, mtp_layers=[])
    with device:
        model = config.build()
        model.init_states()

    def loss_fn(window: torch.Tensor) -> torch.Tensor:
        x = window[:, :-1]
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        masks = None if backend == "sdpa-swap" else model.get_attention_masks(positions)
        return next_token_loss(model(x, positions, masks), window[:, 1:])

    return model, loss_fn


# ------------------------------------------------------------------------------------- report
def format_bench_train(r: dict) -> str:
    """A human table of :func:`bench_train`'s result."""
    m = r["machine"]
    lines = [
        f"train step: preset {r['preset']}, batch {r['batch_size']} x seq {r['seq_len']} = {r['tokens_per_step']:,} "
        f"tokens/step, {r['precision']}, AdamW, {r['steps']} timed steps after {r['warmup']} warmup",
        f"machine: {m['cpu']}, {m['usable_cores']} cores, {m['threads']} threads, torch {m['torch']}, "
        f"transformers {m.get('transformers')}, {m['date']}; bf16 units: {', '.join(m.get('bf16_units') or []) or 'none'}",
        "dsv3 lines compute the loss as `dsv3 train` does (fused, chunked head + cross-entropy) unless "
        "marked [plain-ce]",
        "",
        f"  {'implementation':<40} {'median s':>9} {'mean s':>9} {'tokens/s':>10} {'first loss':>11}",
    ]
    rows = list(r["results"])
    tt = r.get("torchtitan")
    if tt and tt.get("runs"):
        rows.append(tt)
    for x in rows:
        lines.append(f"  {x['name']:<40} {x['step_s_median']:>9.3f} {x['step_s_mean']:>9.3f} "
                     f"{x['tokens_per_s']:>10,.0f} {x['first_loss']:>11.6f}")
    lines.append("")
    if "ratio" in r:
        ok = "same model" if r["first_loss_match"] else "MISMATCH: not the same model?"
        lines.append(f"  ratio ours / {r['reference_transformers']}: {r['ratio']:.2f}x (tokens/s, medians)")
        for other, ratio in list(r.get("ratios", {}).items())[1:]:
            lines.append(f"  ratio {other} / {r['reference_transformers']}: {ratio:.2f}x")
        if r["fastest_transformers"] != r["reference_transformers"]:
            lines.append(f"  ratio ours / fastest ({r['fastest_transformers']}): "
                         f"{r['ratio_vs_fastest_transformers']:.2f}x")
        lines.append(f"  first-step loss |ours - transformers| = {r['first_loss_abs_diff']:.2e} ({ok})")
        for other, diff in list(r.get("first_loss_abs_diff_by_impl", {}).items())[1:]:
            lines.append(f"  first-step loss |{other} - transformers| = {diff:.2e}")
    if "ratio_bf16_vs_fp32" in r:
        lines.append(f"  ratio ours bf16 / ours fp32 (dsv3[fp32], same weights): {r['ratio_bf16_vs_fp32']:.2f}x")
    for k, v in r.get("errors", {}).items():
        lines.append(f"  {k}: failed: {v}")
    if tt:
        version = tt.get("version") or "not importable"
        for a in tt.get("attempts", []):
            if "error" in a:
                lines.append(f"  torchtitan {version} [{a['attn_backend']}]: does not train: {a['error']}")
        if tt.get("runs"):
            note = (" (modified: its LM config refuses SDPA; routed experts run in bf16 as torchtitan casts them)"
                    if tt.get("modified") else "")
            lines.append(f"  torchtitan {version} [{tt['attn_backend']}]: runs, {tt['tokens_per_s']:,.0f} tokens/s"
                         f"{note}")
        elif not tt.get("attempts"):
            lines.append(f"  torchtitan: {tt.get('error')}")
    return "\n".join(lines)
