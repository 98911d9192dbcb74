"""The pre-training loop: ``dsv3 train``.

One step = ``grad_accum`` micro-batches of ``batch_size x seq_len`` tokens:
    loss = LM + lambda/D * sum_k MTP_k + alpha_seq * L_seq + alpha_aux * L_aux
then gradient clipping, AdamW, and the aux-loss-free bias update from the expert counts of the
whole step. Metrics go to ``OUT/metrics.jsonl`` (one JSON line per step, plus ``kind: eval``
lines), checkpoints to ``OUT/checkpoint-STEP/`` and ``OUT/final/`` (model directories a deployment
engine loads as they are; their optimizer/RNG/data state to ``OUT/train_state/``, see ``state.py``),
plots to ``OUT/plots/``.
Resuming restores model, optimizer, schedule, RNG and data position, so on CPU the losses after a
resume equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import PRESETS, ModelConfig, preset
from ..knobs import fraction, knob, nonneg_float, positive_int
from ..model import Transformer
from . import balance
from .batch_ramp import BatchRamp, batch_ramp_spec
from .bias_schedule import BiasSchedule, bias_schedule_spec
from .loop import LoopOptions, Run, optimizer_update, runner_from_env
from .latent_scaling import latent_projections, latent_scale, scale_latent_init
from .context import ContextStage, plan_stage
from .optim import Schedule
from .precision import autocast
from .state import read_trainer_state


class TrainError(RuntimeError):
    """A training run can't start or can't go on (bad data, too many non-finite losses, ...)."""


@dataclass
class TrainConfig(LoopOptions):
    """Every knob of a run; saved in each checkpoint so ``--resume`` continues the same run. The loop's
    own knobs (``fp8``, ``fp8_block``, ``compile``, ``tensorboard``) come from :class:`LoopOptions`."""

    # a run saved before --bias-update-schedule existed ran at its --bias-update-rate from the first step
    FORMER_DEFAULTS = {"bias_update_schedule": None}

    preset: str = knob("tiny", "model shape", choices=sorted(PRESETS))
    data: list[str] | None = knob(None, "text files, directories or JSONL (`text` field); default: the standard "
                                        "library's .py sources", metavar="PATH")
    out: str | None = knob(None, "output directory (default: runs/<preset>)", metavar="DIR")
    cache_dir: str | None = knob(None, "where the tokenizer and token shards live (default: the output directory)",
                                 metavar="DIR")
    max_steps: int = knob(200, "optimizer steps (default: {default})", type=positive_int)
    batch_size: int = knob(8, "sequences per micro-batch (under torchrun: the global batch, split over ranks)",
                           type=positive_int)
    seq_len: int = knob(256, "tokens per sequence", type=positive_int)
    grad_accum: int = knob(1, "micro-batches per step", type=positive_int)
    batch_ramp: str | None = knob(None, "batch-size ramp START:TOKENS[:MULTIPLE] (V3: 3072 -> 15360 over 469B "
                                        "tokens): start at START sequences, grow linearly in tokens to --batch-size "
                                        "over the first TOKENS (K/M/B/T suffixes), in multiples of MULTIPLE (default: "
                                        "the ranks; fixed, the run is the same at any rank count); the LR schedule "
                                        "stays per step (train/batch_ramp.py; default: none, --batch-size from the "
                                        "first step)", type=batch_ramp_spec, metavar="START:TOKENS[:MULTIPLE]")
    extend_context: int | None = knob(None, "with --resume RUN: a context-extension stage at sequence length L "
                                            "(YaRN; DeepSeek-V3 4K -> 32K -> 128K) written to a new run (--out, default "
                                            "RUN-ctxL); batch, constant LR and steps (--max-steps) scaled from the run "
                                            "(train/context.py)", type=positive_int, metavar="L")
    lr: float = knob(3e-3, "peak learning rate", type=nonneg_float)
    warmup_steps: int = knob(20, "linear warmup steps")
    decay_start: float = knob(0.6, "fraction of the run after which the cosine decay starts", type=fraction)
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of --lr", type=fraction)
    weight_decay: float = knob(0.1, "AdamW decay on matrices", type=nonneg_float)
    latent_fan_in_scaling: bool = knob(True, "scale kv_b_proj's init std by sqrt(s) and its LR by s = min(1, "
                                       "hidden/4 / kv_lora_rank) when the MLA latent is wider than hidden/4 "
                                       "(train/latent_scaling.py)")
    grad_clip: float = knob(1.0, "gradient norm clip", type=nonneg_float)
    seed: int = knob(0, "seed for init, data order and FIM")
    save_every: int = knob(100, "checkpoint every N steps (0: only final)")
    eval_every: int = knob(50, "validate every N steps (0: only at the end)")
    eval_batches: int = knob(4, "validation batches", type=positive_int)
    keep_checkpoints: int = knob(2, "how many checkpoint-STEP dirs to keep (older ones are deleted)",
                                 type=positive_int)
    # The demo's balance (issue 17, benchmarks/RESULTS.md): the paper's 1e-3 for 100 steps, then 1e-2 so the bias
    # catches up with the router's preferences before the run ends (1e-3 alone: MaxVio_global 1.1-1.9 at step 200).
    bias_update_rate: float = knob(1e-2, "gamma of aux-loss-free balancing after the --bias-update-schedule's last "
                                         "step (0 with --bias-update-schedule none switches it off)",
                                   type=nonneg_float)
    bias_update_schedule: str | None = knob("0.001:100", "gamma per step GAMMA:UNTIL[,GAMMA:UNTIL...]: GAMMA for the "
                                                         "steps up to UNTIL (1-based), then --bias-update-rate; none: "
                                                         "--bias-update-rate at every step (V3 used 0.001, then 0 for "
                                                         "the last 500B tokens; train/bias_schedule.py)",
                                            type=bias_schedule_spec, metavar="GAMMA:UNTIL,...|none")
    seq_aux_alpha: float = knob(1e-4, "alpha of the complementary sequence-wise balance loss (0: off)",
                                type=nonneg_float)
    aux_loss_alpha: float = knob(0.0, "alpha of the classic (DeepSeek-V2) batch-wise auxiliary balance loss "
                                      "(0: off)", type=nonneg_float)
    mtp_depth: int | None = knob(None, "MTP depth D (default: the preset's num_nextn_predict_layers)")
    mtp_weight: float = knob(0.3, "MTP loss weight lambda", type=nonneg_float)
    fim_rate: float = knob(0.1, "fraction of documents in FIM (PSM) form", type=fraction)
    vocab_size: int = knob(8192, "BPE vocabulary size", type=positive_int)
    tokenizer_train_mb: float = knob(8.0, "MB of training text the BPE tokenizer is learned from",
                                     type=nonneg_float)
    val_fraction: float = knob(0.02, "documents held out for validation", type=fraction)
    max_nonfinite: int = knob(5, "stop after this many non-finite losses in a row", type=positive_int)
    sample_tokens: int = knob(48, "tokens of the sample generated from the final model (0: no sample)")
    progress: bool = knob(True, "no live progress bar")
    device: str | None = knob(None, "torch device (default: cuda if available, else cpu)")
    # Extra ModelConfig fields (tests, experiments); on the command line: --model-set FIELD=VALUE.
    model_overrides: dict = field(default_factory=dict)
    ep: int = knob(1, "expert-parallel size under torchrun (train/parallel/): routed experts split over groups of "
                      "EP ranks; 1: FSDP2 only", type=positive_int)
    pp: int = knob(1, "pipeline-parallel size under torchrun (train/parallel/pipeline.py): the layers split into "
                      "stages over PP ranks, world = pp x dp (data-parallel replicas)", type=positive_int)
    pp_schedule: str = knob("1f1b", "pipeline schedule (torch.distributed.pipelining): 1f1b, interleaved (2 looped "
                                    "virtual stages per rank), zbv or dualpipev (2 stages per rank, V-shaped)",
                            choices=("1f1b", "interleaved", "zbv", "dualpipev"))
    microbatches: int | None = knob(None, "pipeline microbatches per micro-batch, dividing the per-replica batch "
                                          "(default: the smallest count >= 2 x pp that divides it)", type=positive_int)
    fused_ce: bool = knob(True, "compute the training loss from full [batch, seq, vocab] logits instead of the "
                                "fused, chunked head + cross-entropy (kernels/linear_cross_entropy.py; same loss; "
                                "slower, more memory; fused: %(default)s)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.preset}")


def model_config(cfg: TrainConfig, vocab_size: int, bos_id: int, eos_id: int) -> ModelConfig:
    mc = preset(cfg.preset)
    changes = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype="float32",
                   max_position_embeddings=max(mc.max_position_embeddings, cfg.seq_len))
    if cfg.mtp_depth is not None:
        changes["num_nextn_predict_layers"] = cfg.mtp_depth
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    unknown = sorted(set(cfg.model_overrides) - known)
    if unknown:
        raise TrainError(f"unknown model config field(s): {', '.join(unknown)}")
    changes.update(cfg.model_overrides)
    return mc.replace(**changes)


# ------------------------------------------------------------------------------------- data
def prepare_data(cfg: TrainConfig, out_dir: Path, tokenizer=None):
    """Tokenizer (trained once, or the checkpoint's) and the tokenized dataset under OUT/data."""
    from .. import data as D
    from .. import tokenizer as T

    cache = Path(cfg.cache_dir) if cfg.cache_dir else out_dir
    tok_dir = cache / "tokenizer"
    if tokenizer is None:
        if (tok_dir / "tokenizer.json").exists():
            tokenizer = T.Tokenizer.load(tok_dir)
        else:
            budget = int(cfg.tokenizer_train_mb * 1e6)

            def sample_texts():
                used = 0
                for doc in D.iter_documents(cfg.data):
                    if used >= budget:
                        return
                    if D.split_of(doc.doc_id, cfg.val_fraction) == "train":
                        used += len(doc.text)
                        yield doc.text

            tokenizer = T.train_tokenizer(sample_texts(), vocab_size=cfg.vocab_size)
            tokenizer.save(tok_dir)
    dataset = D.build_dataset(
        cache / "data", D.Corpus(cfg.data), tokenizer.encode_batch, eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size, fim_ids=T.fim_ids(tokenizer), fim_rate=cfg.fim_rate, seed=cfg.seed,
        val_fraction=cfg.val_fraction, progress=cfg.progress, tokenizer_fingerprint=tokenizer.fingerprint())
    return tokenizer, dataset


# ------------------------------------------------------------------------------------- losses
def compute_losses(model: Transformer, window: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """window [B, S+1] -> dict of scalar losses (``loss`` is what gets backpropagated)."""
    x, y = window[:, :-1], window[:, 1:]
    B = x.shape[0]
    if cfg.fused_ce and torch.is_grad_enabled() and fused_head_usable(model):
        # Same losses without materializing [B, S, V] logits (~1.5x less time in the head on CPU).
        from ..kernels.linear_cross_entropy import linear_cross_entropy
        h, cos, sin = model.hidden_states(x)
        head = model.lm_head.weight
        mtp_logits = []
        lm = linear_cross_entropy(h, head, y)
        mtp = [linear_cross_entropy(hk, head, y[:, k:]) for k, hk in
               enumerate(model.mtp_hidden_states(x, h, cos, sin), start=1)]
    else:
        out = model(x, return_mtp=True)
        mtp_logits = out.mtp_logits
        V = out.logits.shape[-1]
        lm = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
        # depth k at position i predicts token i+k+1 of the window, i.e. y[:, k:]
        mtp = [F.cross_entropy(lg.reshape(-1, V), y[:, k:].reshape(-1)) for k, lg in enumerate(out.mtp_logits, start=1)]
    losses = {"lm_loss": lm}
    total = lm
    if mtp:
        mtp = torch.stack(mtp)
        losses["mtp_loss"] = mtp.mean()
        total = total + cfg.mtp_weight * mtp.mean()
    bal = torch.zeros((), device=x.device)
    for _, r in balance.routers(model):
        if r.last_scores is None:
            continue
        if cfg.seq_aux_alpha:
            bal = bal + cfg.seq_aux_alpha * balance.sequence_balance_loss(r.last_scores, r.last_topk, B)
        if cfg.aux_loss_alpha:
            bal = bal + cfg.aux_loss_alpha * balance.batch_balance_loss(r.last_scores, r.last_topk)
    losses["balance_loss"] = bal
    losses["loss"] = total + bal
    losses["_mtp_logits"] = mtp_logits
    return losses


def fused_head_usable(model) -> bool:
    """Whether the fused head may read ``lm_head.weight`` directly: only on the plain reference model
    (FSDP, compile wrappers or hooks on the root or head need their own forward to run)."""
    head = getattr(model, "lm_head", None)
    if type(model) is not Transformer or type(head) is not torch.nn.Linear:
        return False
    if model._forward_pre_hooks or model._forward_hooks or head._forward_pre_hooks or head._forward_hooks:
        return False
    return type(head.weight) in (torch.nn.Parameter, torch.Tensor)   # not a DTensor or other subclass


@torch.no_grad()
def evaluate(model: Transformer, batches: list[torch.Tensor], cfg: TrainConfig, device) -> dict:
    """Val loss, perplexity, MaxVio_global, MTP top-1 accuracy, per-layer expert load."""
    model.eval()
    names = [n for n, _ in balance.routers(model) if n.startswith("layers.")]
    routers = dict(balance.routers(model))
    load = None
    loss_sum, n_tok, mtp_hit, mtp_n = 0.0, 0, 0, 0
    for w in batches:
        w = w.to(device)
        with autocast(device, cfg.dtype):
            out = compute_losses(model, w, cfg)
        ntok = w[:, 1:].numel()
        loss_sum += float(out["lm_loss"]) * ntok
        n_tok += ntok
        if out["_mtp_logits"]:
            pred = out["_mtp_logits"][0].argmax(-1)
            mtp_hit += int((pred == w[:, 2:]).sum())
            mtp_n += pred.numel()
        counts = torch.stack([routers[n].last_counts for n in names]) if names else None
        load = counts if load is None else load + counts
    model.train()
    val_loss = loss_sum / max(n_tok, 1)
    rec = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    if load is not None:
        mv = balance.max_violation(load)
        rec.update(maxvio_global=float(mv.mean()), maxvio_global_per_layer=[float(v) for v in mv],
                   expert_load=load.tolist())
    if mtp_n:
        rec["mtp_top1_acc"] = mtp_hit / mtp_n
    return rec


# ------------------------------------------------------------------------------------- the run
LOGGED_LOSSES = ("loss", "lm_loss", "mtp_loss", "balance_loss")


# What a context-extension stage takes from this launch, as a resume does (the parallel layout is per launch).
LAUNCH_FIELDS = ("progress", "device", "ep", "pp", "pp_schedule", "microbatches")

# Settings a context-extension stage takes from the command line when they differ from their defaults
# (the rest come from the run being extended, or from the stage's plan: seq_len, rope, warmup, ...).
STAGE_TUNABLE = ("batch_size", "lr", "grad_accum", "weight_decay", "grad_clip", "save_every", "eval_every",
                 "eval_batches", "keep_checkpoints", "bias_update_rate", "bias_update_schedule", "seq_aux_alpha",
                 "aux_loss_alpha", "mtp_weight", "max_nonfinite", "sample_tokens", "fused_ce", "compile")


def extension_stage(cfg: TrainConfig, source: str | Path | None, resume: bool, steps: int | None,
                    granule: int = 1) -> tuple[TrainConfig, ContextStage]:
    """The run config of a context-extension stage of the run in ``source`` at ``cfg.extend_context``
    tokens (``train/context.py``); ``cfg`` contributes the stage's ``out``, the per-invocation fields
    (``LAUNCH_FIELDS``) and those of ``STAGE_TUNABLE`` it sets to other than their defaults (a
    batch or LR of your own instead of the scaled ones, eval/save cadence); ``steps`` is the stage's
    step budget (None: the default share)."""
    if source is None:
        raise TrainError("--extend-context needs --resume RUN: the trained run to continue at the longer length")
    if cfg.extend_context is None:
        raise TrainError("a run to extend was given without --extend-context L")
    if resume:
        raise TrainError("a context-extension stage starts a new run; to continue an interrupted stage, "
                         "--resume its directory without --extend-context")
    stage = plan_stage(source, cfg.extend_context, out=cfg.out, steps=steps, granule=granule, error=TrainError)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in stage.config.items() if k in known}
    # this launch's own settings (as a resume keeps them): progress, device and the parallel layout
    fields.update({k: getattr(cfg, k) for k in LAUNCH_FIELDS if k in known})
    defaults = TrainConfig()
    fields.update({k: getattr(cfg, k) for k in STAGE_TUNABLE if getattr(cfg, k) != getattr(defaults, k)})
    stage.config, stage.record = fields, {**stage.record, "batch_size": fields["batch_size"], "lr": fields["lr"]}
    return TrainConfig(**fields), stage


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, log=print,
          extend_from: str | Path | None = None) -> dict:
    """Run (or resume) training; returns the end-of-run summary.

    With ``resume``, the run in ``cfg.out`` continues from its last complete checkpoint with its own
    saved settings; ``max_steps`` (if given) extends or shortens it. Under torchrun (``WORLD_SIZE >
    1``) the same run is sharded with FSDP2 / expert parallel (``train/parallel/``).
    With ``cfg.extend_context`` and ``extend_from`` (a run directory), a context-extension stage of
    that run (``train/context.py``) runs as a new run in ``cfg.out`` (default ``RUN-ctxL``),
    ``max_steps`` being the stage's steps; it evaluates once before its first step.
    """
    from .. import data as D
    from .. import tokenizer as T
    pipeline = cfg.pp > 1
    if pipeline:  # the layout is this launch's: a run resumes at any pp x dp (or in one process)
        from .parallel.pipeline import PipelineTraining
        runner = PipelineTraining.from_cfg(cfg)
    else:
        runner = runner_from_env(cfg.device, cfg.ep)
    stage = None
    if cfg.extend_context is not None or extend_from is not None:
        cfg, stage = extension_stage(cfg, extend_from, resume, max_steps, runner.world_size)
        max_steps = None  # already the stage's budget
    run = Run.open(cfg, runner, resume=resume, steps=max_steps, state_key="train_config",
                   keep=("progress", "device", "out", "ep", "pp", "pp_schedule", "microbatches"), error=TrainError,
                   log=log, what="run")
    cfg, ckpt, log, out_dir = run.cfg, run.ckpt, run.log, run.out_dir
    if pipeline:
        runner.configure(cfg)  # the run's batch and loss settings, for the stages run.prepare builds
    ramp = None
    if cfg.batch_ramp:
        try:  # batch size per step (global), fixed by the step alone: a resume recomputes the same sizes
            ramp = BatchRamp.parse(cfg.batch_ramp).sizes(cfg.batch_size, cfg.seq_len * cfg.grad_accum,
                                                         cfg.max_steps, runner.world_size)
        except ValueError as e:
            raise TrainError(f"--batch-ramp: {e}") from None
    try:  # gamma per step, fixed by the step alone: a resume applies the same rates
        bias_schedule = BiasSchedule.parse(cfg.bias_update_schedule) if cfg.bias_update_schedule else None
    except ValueError as e:
        raise TrainError(f"--bias-update-schedule: {e}") from None
    if stage is not None:
        log(f"context extension stage {stage.record['stage']}: {stage.source} (step {stage.record['source_step']}) "
            f"{stage.record['from_seq_len']} -> {cfg.seq_len} tokens, YaRN factor {stage.record['factor']:g} over "
            f"{stage.record['original_max_position_embeddings']}, batch {cfg.batch_size}, constant LR {cfg.lr:.3g}, "
            f"{cfg.max_steps} steps -> {out_dir}")
    torch.manual_seed(cfg.seed)
    device = runner.device
    with runner.main_first():  # rank 0 trains the tokenizer / tokenizes first
        tok_from = ckpt or (stage.source if stage is not None else None)
        tokenizer, dataset = prepare_data(cfg, out_dir, T.Tokenizer.load(tok_from) if tok_from else None)
    batches = runner.packed_batches(dataset, cfg.batch_size, cfg.seq_len, cfg.seed)  # this rank's slice
    val = D.val_batches(dataset, cfg.batch_size, cfg.seq_len, cfg.eval_batches)

    mc = model_config(cfg, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    model = Transformer(mc).to(device)
    s = latent_scale(mc) if cfg.latent_fan_in_scaling else 1.0
    scale_latent_init(model, s)  # a resumed run's weights replace these anyway
    make_optimizer = run.prepare(model)  # --fp8, then sharding; the optimizer is built over the shards
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, scaled=latent_projections(model), lr_scale=s)
    schedule = Schedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_start, cfg.min_lr_ratio)
    extra = {}  # more trainer-state entries, saved with every checkpoint of the run
    if stage is not None:  # the source's weights, AdamW moments and RNG; the stage counts its steps from 0
        runner.load(stage.source, model, optimizer)
        extra["context_extension"] = stage.record
    elif ckpt is not None and "context_extension" in (saved_state := read_trainer_state(ckpt)):
        extra["context_extension"] = saved_state["context_extension"]  # resuming a stage keeps its record
    start = run.restore(model, optimizer, tokenizer, batches, **extra)  # each rank loads its shards; then --compile
    model.train()
    routers = runner.routers() if pipeline else balance.routers(model)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum

    def micro_batches():
        if pipeline:  # the schedule runs its microbatches' forward and backward (losses already / grad_accum)
            for _ in range(cfg.grad_accum):
                yield runner.forward_backward(next(batches).to(device))
            return
        for _ in range(cfg.grad_accum):
            with autocast(device, cfg.dtype):
                losses = compute_losses(model, next(batches).to(device), cfg)
            yield losses["loss"] / cfg.grad_accum, {k: float(losses[k].detach()) / cfg.grad_accum
                                                    for k in LOGGED_LOSSES if k in losses}

    def step(i: int) -> tuple[dict, bool]:
        t0 = time.perf_counter()
        step_tokens = tokens_per_step
        if ramp is not None:  # this step's global batch; each rank takes its equal slice
            batches.batch_size = ramp[i] // runner.world_size
            step_tokens = ramp[i] * cfg.seq_len * cfg.grad_accum
        gamma = cfg.bias_update_rate if bias_schedule is None else bias_schedule.rate(i + 1, cfg.bias_update_rate)
        rec, finite = optimizer_update(runner, model, optimizer, schedule(i), micro_batches(), cfg.grad_clip,
                                       routers, gamma, sums=dict.fromkeys(LOGGED_LOSSES, 0.0))
        if bias_schedule is not None:
            rec["bias_update_rate"] = gamma
        rec["tokens_per_s"] = step_tokens / (time.perf_counter() - t0)
        if ramp is not None:
            rec["batch_size"] = ramp[i]
        return rec, finite

    final, last_eval = run.loop(cfg.max_steps, step, (lambda: runner.evaluate(val)) if pipeline else
                                (lambda: evaluate(model, val, cfg, device)), desc="train",
                                eval_at_start=stage is not None)  # a stage's step-0 eval: the long-length loss before
    final_step = max(start, cfg.max_steps)

    def summarize() -> dict:  # rank 0 alone writes plots and the summary (and samples)
        from ..accounting import param_counts
        from .plots import plot_run
        plots = plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
        pc = param_counts(mc)
        tps = [r["tokens_per_s"] for r in run.metrics.records()[0][-20:]]
        summary = {
            "out": str(out_dir), "final": str(final), "steps": final_step,
            "params": pc["total"], "active_params": pc["active"], "mtp_params": pc.get("mtp", 0),
            "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
            "unigram_baseline_loss": D.unigram_entropy(dataset),
            "maxvio_global": last_eval.get("maxvio_global"), "mtp_top1_acc": last_eval.get("mtp_top1_acc"),
            "plots": [str(p) for p in plots],
        }
        if "context_extension" in extra:
            at_start = [r for r in run.metrics.records()[1] if r["step"] == 0]
            summary["context_extension"] = {**extra["context_extension"],
                                            "val_loss_at_start": at_start[0]["val_loss"] if at_start else None}
        if cfg.compile:  # generation's cache and shapes change every step: eager is the right tool there
            from .compile import uncompile_model
            uncompile_model(model)
        if cfg.sample_tokens:
            from ..sample import generate
            prompt_text = "def "
            ids = [tokenizer.bos_id] + tokenizer.encode(prompt_text)
            gen = generate(runner.sampling_model(model, final), ids, cfg.sample_tokens, temperature=0.7,
                           top_k=40, seed=cfg.seed, stop_ids=(tokenizer.eos_id,))
            summary["sample"] = prompt_text + tokenizer.decode(gen, skip_special_tokens=True)
        return summary

    return run.finish(summarize)
