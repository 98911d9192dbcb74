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
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import PRESETS, ModelConfig, preset
from ..device import resolve_device
from ..knobs import fraction, knob, nonneg_float, positive_int
from ..model import Transformer
from . import balance
from .optim import Schedule, build_optimizer
from .state import (clean_stale_temps, latest_checkpoint, list_checkpoints, load_training_state,
                    previous_checkpoints, read_trainer_state, remove_checkpoint, save_training_checkpoint)


class TrainError(RuntimeError):
    """A training run can't start or can't go on (bad data, too many non-finite losses, ...)."""


@dataclass
class TrainConfig:
    """Every knob of a run; saved in each checkpoint so ``--resume`` continues the same run."""

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
    lr: float = knob(3e-3, "peak learning rate", type=nonneg_float)
    warmup_steps: int = knob(20, "linear warmup steps")
    decay_start: float = knob(0.6, "fraction of the run after which the cosine decay starts", type=fraction)
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of --lr", type=fraction)
    weight_decay: float = knob(0.1, "AdamW decay on matrices", type=nonneg_float)
    grad_clip: float = knob(1.0, "gradient norm clip", type=nonneg_float)
    seed: int = knob(0, "seed for init, data order and FIM")
    save_every: int = knob(100, "checkpoint every N steps (0: only final)")
    eval_every: int = knob(50, "validate every N steps (0: only at the end)")
    eval_batches: int = knob(4, "validation batches", type=positive_int)
    keep_checkpoints: int = knob(2, "how many checkpoint-STEP dirs to keep (older ones are deleted)",
                                 type=positive_int)
    bias_update_rate: float = knob(1e-3, "gamma of aux-loss-free balancing (0 switches it off)", type=nonneg_float)
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
    fp8: bool = knob(False, "FP8 mixed precision (DeepSeek-V3 recipe; train/fp8.py): E4M3 GEMMs in forward and "
                            "backward with 1x128 activation tiles and 128x128 weight blocks, fp32 master weights, "
                            "bf16 AdamW moments")
    fp8_block: int = knob(128, "FP8 tile/block size (1xB activation tiles, BxB weight blocks)", type=positive_int)
    ep: int = knob(1, "expert-parallel size under torchrun (train/parallel/): routed experts split over groups of "
                      "EP ranks; 1: FSDP2 only", type=positive_int)
    fused_ce: bool = knob(True, "compute the training loss from full [batch, seq, vocab] logits instead of the "
                                "fused, chunked head + cross-entropy (kernels/linear_cross_entropy.py; same loss; "
                                "slower, more memory; fused: %(default)s)")
    compile: bool = knob(False, "torch.compile the attention, norms, MLPs and routers (train/compile.py): faster "
                                "steps after a one-off compile (about a minute on CPU; needs a C++ compiler)")

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
        with _autocast(device):
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


def _autocast(device: torch.device):
    # bf16 autocast on GPU; fp32 on CPU (CPU bf16 matmuls are slow and the tiny runs don't need them)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ------------------------------------------------------------------------------------- the run
class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def train(cfg: TrainConfig, resume: bool = False, max_steps: int | None = None, log=print) -> dict:
    """Run (or resume) training; returns the end-of-run summary.

    With ``resume``, the run in ``cfg.out`` continues from its last complete checkpoint with its own
    saved settings; ``max_steps`` (if given) extends or shortens it.
    """
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=max_steps)
    # Under torchrun (WORLD_SIZE > 1): FSDP2 / expert parallel; None in a single process (plain path).
    from .parallel.training import ParallelTraining
    dp = ParallelTraining.from_env(cfg.device, cfg.ep)
    main = dp is None or dp.is_main
    if not main:  # rank 0 logs, shows progress and writes files
        from .parallel.training import silent as log
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        clean_stale_temps(out_dir)
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise TrainError(f"{out_dir}: no complete checkpoint to resume from")
    if not resume:  # a fresh run replaces the previous run's checkpoints (the data cache is kept)
        old = previous_checkpoints(out_dir)
        if old:
            log(f"{out_dir}: starting a new run, removing {len(old)} checkpoint(s) of the previous one "
                "(use --resume to continue it instead)")
        for p in old if main else []:
            remove_checkpoint(p)
    if dp is not None:
        dp.ctx.barrier()  # the old run is gone before any rank looks at the directory
    if ckpt is not None:  # the run's own settings win; only the step budget may be extended
        saved = read_trainer_state(ckpt)["train_config"]
        here = {"progress": cfg.progress, "device": cfg.device, "out": cfg.out, "ep": cfg.ep}
        if max_steps is not None:
            here["max_steps"] = max_steps
        cfg = TrainConfig(**{**saved, **here})
    if not main:
        cfg = dataclasses.replace(cfg, progress=False)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device) if dp is None else dp.device

    from .. import tokenizer as T
    with nullcontext() if dp is None else dp.main_first():  # rank 0 trains the tokenizer / tokenizes first
        tokenizer, dataset = prepare_data(cfg, out_dir, T.Tokenizer.load(ckpt) if ckpt else None)
    from .. import data as D
    if dp is None:
        batches = D.PackedBatches(dataset, cfg.batch_size, cfg.seq_len, split="train", seed=cfg.seed)
    else:  # cfg.batch_size is the global batch; this rank's slice of it
        batches = dp.packed_batches(dataset, cfg.batch_size, cfg.seq_len, cfg.seed)
    val = D.val_batches(dataset, cfg.batch_size, cfg.seq_len, cfg.eval_batches)

    mc = model_config(cfg, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    model = Transformer(mc).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    if cfg.fp8:
        from .fp8 import FP8TrainingConfig, apply_fp8_training, build_fp8_optimizer
        apply_fp8_training(model, FP8TrainingConfig(block=cfg.fp8_block))
        optimizer = build_fp8_optimizer(model, cfg.lr, cfg.weight_decay)
    if dp is not None:  # shard from outside the model, then the optimizer over the shards
        dp.parallelize(model, log)
        optimizer = (build_fp8_optimizer if cfg.fp8 else build_optimizer)(model, cfg.lr, cfg.weight_decay)
    schedule = Schedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_start, cfg.min_lr_ratio)
    start = 0
    if ckpt is not None and dp is not None:  # saved at any world size: each rank loads its shards
        state = dp.load(ckpt, model, optimizer)
    elif ckpt is not None:
        from ..checkpoint import load_pretrained
        loaded = load_pretrained(ckpt, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        state = load_training_state(ckpt, optimizer)
    if ckpt is not None:
        start = state["step"]
        batches.load_state_dict(state["data"])
        log(f"resumed from {ckpt} at step {start}")
    if cfg.compile:  # from outside the model; compiles during the first steps
        if cfg.fp8 or dp is not None:
            raise TrainError("--compile is supported in a single process without --fp8")
        from .compile import compile_model
        compile_model(model)
    model.train()
    metrics = MetricsLog(out_dir / "metrics.jsonl", start if ckpt is not None else None) if main else dp.null_log()
    routers = balance.routers(model)
    main_names = [n for n, _ in routers if n.startswith("layers.")]

    def save(name: str, step: int) -> Path:
        st = {"step": step, "data": batches.state_dict(), "train_config": dataclasses.asdict(cfg)}
        return (save_training_checkpoint if dp is None else dp.save)(out_dir, name, model, tokenizer, optimizer, st)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    nonfinite = 0
    last_eval: dict = {}
    progress = _progress(cfg, start)
    t_run = time.perf_counter()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = schedule(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        counts = {n: 0 for n, _ in routers}
        finite = True
        for _ in range(cfg.grad_accum):
            w = next(batches).to(device)
            with _autocast(device):
                losses = compute_losses(model, w, cfg)
            if not torch.isfinite(losses["loss"]):
                finite = False
            (losses["loss"] / cfg.grad_accum).backward()
            for k in sums:
                if k in losses:
                    sums[k] += float(losses[k].detach()) / cfg.grad_accum
            for n, r in routers:
                if r.last_counts is not None:
                    counts[n] = counts[n] + r.last_counts
        if dp is not None:  # global losses, finite flag and expert counts: every rank updates biases alike
            sums, finite, counts = dp.reduce_step(sums, finite, counts)
        grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if dp is None
                     else dp.clip_grad_norm(model, cfg.grad_clip))
        finite = finite and math.isfinite(grad_norm)
        rec = {"step": step + 1, **sums, "lr": lr, "grad_norm": grad_norm}
        nonfinite = finish_update(optimizer, routers, counts, main_names, finite, nonfinite, rec,
                                  cfg.bias_update_rate, log)
        rec["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
        metrics.write(rec)
        if nonfinite >= cfg.max_nonfinite:
            progress.close()
            raise TrainError(f"stopping: {nonfinite} non-finite losses in a row at step {step + 1} "
                             f"(last checkpoint: {latest_checkpoint(out_dir)})")
        done = step + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            last_eval = {"kind": "eval", "step": done, **evaluate(model, val, cfg, device)}
            metrics.write(last_eval)
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
            save(f"checkpoint-{done}", done)
            for _, old in list_checkpoints(out_dir)[: -max(1, cfg.keep_checkpoints)] if main else []:
                remove_checkpoint(old)
        progress.update(rec, last_eval)
    progress.close()
    final_step = max(start, cfg.max_steps)
    if not last_eval or last_eval.get("step") != final_step:
        last_eval = {"kind": "eval", "step": final_step, **evaluate(model, val, cfg, device)}
        metrics.write(last_eval)
    final = save("final", final_step)
    if not main:  # rank 0 writes plots and the summary (and samples) alone
        return dp.finish(None)
    from .plots import plot_run
    plots = plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
    from ..accounting import param_counts
    pc = param_counts(mc)
    train_recs = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()
                  if ln.strip() and "kind" not in json.loads(ln)]
    tps = [r["tokens_per_s"] for r in train_recs[-20:]]
    summary = {
        "out": str(out_dir), "final": str(final), "steps": final_step,
        "params": pc["total"], "active_params": pc["active"], "mtp_params": pc.get("mtp", 0),
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
        "unigram_baseline_loss": D.unigram_entropy(dataset),
        "maxvio_global": last_eval.get("maxvio_global"), "mtp_top1_acc": last_eval.get("mtp_top1_acc"),
        "plots": [str(p) for p in plots], "wall_s": time.perf_counter() - t_run,
    }
    if cfg.compile:  # generation's cache and shapes change every step: eager is the right tool there
        from .compile import uncompile_model
        uncompile_model(model)
    if cfg.sample_tokens:
        from ..sample import generate
        prompt_text = "def "
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt_text)
        gen = generate(model if dp is None else dp.plain_model(final), ids, cfg.sample_tokens, temperature=0.7,
                       top_k=40, seed=cfg.seed, stop_ids=(tokenizer.eos_id,))
        summary["sample"] = prompt_text + tokenizer.decode(gen, skip_special_tokens=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary if dp is None else dp.finish(summary)


def finish_update(optimizer, routers, counts: dict, main_names: list, finite: bool, nonfinite: int, rec: dict,
                  bias_update_rate: float, log=print) -> int:
    """Close a training step; returns the new count of non-finite steps in a row.

    Finite loss and gradients: the optimizer step, then the aux-loss-free bias update from the whole
    step's expert counts. Otherwise the update is skipped and logged. Either way the gradients are
    zeroed and ``rec`` gets MaxVio_batch of the main model's MoE layers (``main_names``).
    Shared by pre-training and SFT.
    """
    if finite:
        optimizer.step()
        for n, r in routers:
            if counts[n] is not None:
                balance.update_bias(r, counts[n], bias_update_rate)
        nonfinite = 0
    else:
        nonfinite += 1
        rec["skipped"] = True
        log(f"step {rec['step']}: non-finite loss/gradient, update skipped ({nonfinite} in a row)")
    optimizer.zero_grad(set_to_none=True)
    if main_names and all(counts[n] is not None for n in main_names):
        mv = balance.max_violation(torch.stack([counts[n] for n in main_names]))
        rec["maxvio_batch"] = [float(v) for v in mv]
        rec["maxvio_batch_mean"] = float(mv.mean())
    return nonfinite


def _train_postfix(rec: dict, last_eval: dict) -> dict:
    post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
    if "maxvio_batch_mean" in rec:
        post["maxvio"] = f"{rec['maxvio_batch_mean']:.2f}"
    if last_eval:
        post["val"] = f"{last_eval['val_loss']:.3f}"
    return post


class _progress:
    """A live progress bar (tqdm) over ``cfg.max_steps``; silent unless ``cfg.progress``.

    ``postfix(rec, last_eval)`` picks what the bar shows (default: loss, tok/s, MaxVio, val loss);
    SFT uses the same bar with its own fields.
    """

    def __init__(self, cfg, start: int, desc: str = "train", postfix=_train_postfix):
        self.bar, self.postfix = None, postfix
        if cfg.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, rec: dict, last_eval: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(self.postfix(rec, last_eval), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
