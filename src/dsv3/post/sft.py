"""Supervised fine-tuning: ``dsv3 sft --model BASE --data FILE.jsonl --out DIR``.

A base model becomes a chat model by training on conversations rendered with its chat template,
with the loss on assistant tokens only (:mod:`dsv3.post.chat_data`). Per step::

    loss = CE(assistant tokens) + lambda * mean_k CE_k(MTP, assistant tokens)
           + distill_weight * KL(teacher top-k || student)   (records from `dsv3 distill --top-logprobs`)
           + alpha_seq * L_seq                                 (sequence-wise balance loss)

then clipping, AdamW and the aux-loss-free bias update, exactly as in pre-training. The run
directory has the pre-training guarantees and layout (the same code writes them): ``metrics.jsonl``,
atomic ``checkpoint-STEP/`` and ``final/`` (HF layout: config, safetensors, tokenizer with the chat
template, plus optimizer/RNG/data state), ``plots/``, ``summary.json``; ``--resume`` continues
bit for bit on CPU. ``final/`` is what ``dsv3 chat --model`` and ``dsv3 serve --model`` take.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..knobs import fraction, knob, nonneg_float, positive_int
from ..train import balance
from ..train.loop import LoopOptions, Run, optimizer_update, runner_from_env
from ..train.precision import autocast
from ..train.optim import Schedule


class SFTError(RuntimeError):
    """An SFT run can't start or go on; the message says why."""


@dataclass
class SFTConfig(LoopOptions):
    """Every knob of an SFT run; saved in each checkpoint so ``--resume`` continues the same run. The
    loop's own knobs (``fp8``, ``fp8_block``, ``compile``, ``tensorboard``) come from :class:`LoopOptions`."""

    # a LoRA run checkpointed before --lora-modules-to-save existed froze the embedding and head
    FORMER_DEFAULTS = {"lora_modules_to_save": ""}

    model: str = knob("runs/tiny/final", "the base model directory (HF layout with tokenizer), e.g. runs/tiny/final "
                                         "(required unless --resume)", metavar="DIR")
    data: list[str] = knob(default_factory=list, help="chat JSONL file(s) (required unless --resume)", metavar="FILE")
    out: str = knob("runs/sft", "run directory", metavar="DIR")
    max_steps: int | None = knob(None, "optimizer steps (default: --epochs passes over the packed rows)",
                                 type=positive_int)
    epochs: float = knob(2.0, "passes over the data when --max-steps is not given", type=nonneg_float)
    batch_size: int = knob(8, "packed rows per step", type=positive_int)
    seq_len: int = knob(512, "tokens per packed row (capped at the model's context); longer conversations are cut",
                        type=positive_int)
    lr: float = knob(5e-4, "peak learning rate", type=nonneg_float)
    warmup_steps: int = knob(10, "linear warmup steps")
    decay_start: float = knob(0.0, "fraction of the run after which the cosine decay starts (post-training "
                                   "convention: from the end of warmup)", type=fraction)
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of --lr (cosine)", type=fraction)
    weight_decay: float = knob(0.1, "AdamW decay on matrices", type=nonneg_float)
    grad_clip: float = knob(1.0, "gradient norm clip", type=nonneg_float)
    seed: int = knob(0, "seed of the data order")
    save_every: int = knob(100, "checkpoint every N steps (0: only final)")
    eval_every: int = knob(50, "validate every N steps (0: only at the end)")
    keep_checkpoints: int = knob(2, "how many checkpoint-STEP dirs to keep", type=positive_int)
    val_fraction: float = knob(0.05, "share of conversations held out for validation (by a hash of the record)",
                               type=fraction)
    mtp_weight: float = knob(0.1, "weight of the MTP loss on assistant tokens (keeps speculative decoding useful)",
                             type=nonneg_float)
    distill_weight: float = knob(0.5, "weight of the KL term toward teacher top-k log-probs (records with a "
                                      "'teacher' field)", type=nonneg_float)
    bias_update_rate: float = knob(1e-3, "aux-loss-free balancing gamma (0: off)", type=nonneg_float)
    seq_aux_alpha: float = knob(1e-4, "alpha of the complementary sequence-wise balance loss (0: off)",
                                type=nonneg_float)
    max_nonfinite: int = knob(5, "stop after this many non-finite losses in a row", type=positive_int)
    # LoRA (dsv3/lora.py): adapters on the frozen base; checkpoints and final/ hold the adapter only
    lora_rank: int = knob(0, "LoRA rank r (0: full fine-tuning): train low-rank adapters on the frozen base; "
                             "OUT/final is then a PEFT adapter for `--model BASE --adapter OUT/final`", type=int,
                          metavar="R")
    lora_alpha: float | None = knob(None, "LoRA alpha (the update is scaled by alpha / r; default 2 r)",
                                    type=float)
    lora_targets: str = knob("q,kv,o", "modules that get adapters, comma-separated: q (q_proj or q_a/q_b_proj), "
                                       "kv (kv_a_proj_with_mqa, kv_b_proj), o (o_proj), shared (shared experts), "
                                       "experts (every routed expert)", metavar="LIST")
    lora_base_dtype: str = knob("fp32", "how the frozen base weights of adapted layers are stored: fp32, bf16, or "
                                        "int8 per output channel (QLoRA-style)", choices=("fp32", "bf16", "int8"))
    lora_dropout: float = knob(0.0, "dropout on the adapters' input", type=fraction)
    # default on: without them LoRA r16 never learned the chat/thinking format on the demo (the new special
    # tokens' embedding and head rows stay as pre-training left them); benchmarks/RESULTS.md "LoRA"
    lora_modules_to_save: str = knob("embed,head", "modules trained whole beside the adapters and saved in them "
                                                   "(PEFT's modules_to_save), comma-separated: embed (embed_tokens), "
                                                   "head (lm_head); '' for none", metavar="LIST")
    progress: bool = knob(True, "no live progress bar")
    device: str | None = knob(None, "torch device (default: cuda if available, else cpu)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


# --------------------------------------------------------------------------------------- losses
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (0 when nothing is masked in)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def topk_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Forward KL from the teacher's top-k distribution to the student, per position.

    logits [..., V] (student), teacher_ids / teacher_logprobs [..., K] -> [...]. The teacher's k
    probabilities are renormalized to sum 1 (they are all we kept); the student's log-probabilities
    are its full-vocabulary ones, so mass outside the teacher's top-k is penalized too.
    """
    p_log = teacher_logprobs.float().log_softmax(-1)                  # renormalize over the K kept
    q_log = logits.float().log_softmax(-1).gather(-1, teacher_ids)     # [..., K]
    p = p_log.exp()                                                    # -inf padding -> 0
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def token_counts(batch: dict[str, torch.Tensor], mtp_depth: int) -> torch.Tensor:
    """The token counts :func:`sft_losses` averages over: [assistant targets, MTP depth 1..D targets,
    distillation targets] -> [D + 2]."""
    mask = batch["targets_mask"]
    return torch.stack([mask.sum()] + [mask[:, k:].sum() for k in range(1, mtp_depth + 1)]
                       + [(batch["teacher_valid"] & mask).sum()])


def sft_losses(model, batch: dict[str, torch.Tensor], cfg: SFTConfig,
               shares: list[float] | None = None) -> dict[str, torch.Tensor]:
    """One packed batch -> scalar losses (``loss`` is backpropagated) and token counts.

    ``shares`` (data parallel; in :func:`token_counts` order): this rank's share of each global token
    count times the number of ranks, so that the ranks' mean of each term is its mean over the
    global batch's tokens, as in one process.
    """
    def scaled(value: torch.Tensor, i: int) -> torch.Tensor:
        return value if shares is None else value * shares[i]

    tokens, mask = batch["tokens"], batch["targets_mask"]
    x, y = tokens[:, :-1], tokens[:, 1:]                               # [B, S]
    B = x.shape[0]
    want_mtp = cfg.mtp_weight > 0 and len(model.mtp) > 0
    out = model(x, return_mtp=want_mtp) if want_mtp else None
    logits = out.logits if want_mtp else model(x)                      # [B, S, V]
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view_as(y)
    lm = scaled(masked_mean(ce, mask), 0)
    losses = {"lm_loss": lm, "target_tokens": mask.sum()}
    total = lm
    if want_mtp and out.mtp_logits:
        # depth k at input position i predicts target i+k (y[:, k:]); only assistant targets count
        mtp = torch.stack([
            scaled(masked_mean(F.cross_entropy(lg.reshape(-1, V), y[:, k:].reshape(-1), reduction="none")
                               .view_as(y[:, k:]), mask[:, k:]), k)
            for k, lg in enumerate(out.mtp_logits, start=1)])
        losses["mtp_loss"] = mtp.mean()
        total = total + cfg.mtp_weight * mtp.mean()
    valid = batch["teacher_valid"] & mask
    if cfg.distill_weight and bool(valid.any()):
        kl = scaled(masked_mean(topk_kl(logits, batch["teacher_ids"], batch["teacher_logprobs"]), valid), -1)
        losses["distill_kl"] = kl
        total = total + cfg.distill_weight * kl
    bal = torch.zeros((), device=x.device)
    if cfg.seq_aux_alpha:
        for _, r in balance.routers(model):
            if r.last_scores is not None and r.last_scores.shape[0] % B == 0:
                bal = bal + cfg.seq_aux_alpha * balance.sequence_balance_loss(r.last_scores, r.last_topk, B)
    losses["balance_loss"] = bal
    losses["loss"] = total + bal
    return losses


@torch.no_grad()
def evaluate_sft(model, packed, cfg: SFTConfig, device: torch.device) -> dict:
    """Assistant-token loss / perplexity / next-token accuracy on the held-out rows, MaxVio_global."""
    model.eval()
    names = [n for n, _ in balance.routers(model) if n.startswith("layers.")]
    routers = dict(balance.routers(model))
    loss_sum, hits, n_tok, load = 0.0, 0, 0, None
    for start in range(0, len(packed), cfg.batch_size):
        batch = {k: v.to(device) for k, v in packed.rows(list(range(start, min(start + cfg.batch_size,
                                                                                 len(packed))))).items()}
        x, y, m = batch["tokens"][:, :-1], batch["tokens"][:, 1:], batch["targets_mask"]
        with autocast(device, cfg.dtype):
            logits = model(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
        loss_sum += float((ce * m).sum())
        hits += int(((logits.argmax(-1) == y) & m).sum())
        n_tok += int(m.sum())
        if names:
            counts = torch.stack([routers[n].last_counts for n in names])
            load = counts if load is None else load + counts
    model.train()
    loss = loss_sum / max(n_tok, 1)
    rec = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_token_acc": hits / max(n_tok, 1),
           "val_tokens": n_tok}
    if load is not None:
        mv = balance.max_violation(load)
        rec.update(maxvio_global=float(mv.mean()), expert_load=load.tolist())
    return rec


# --------------------------------------------------------------------------------------- the run
def load_chat_data(cfg: SFTConfig, tokenizer, max_positions: int):
    """(train PackedChat, val PackedChat or None, seq_len used) for a run."""
    from .chat_data import pack, read_chat_jsonl, split_examples
    if not cfg.data:
        raise SFTError("no chat data: give --data FILE.jsonl")
    examples = read_chat_jsonl(cfg.data, tokenizer)
    seq_len = min(cfg.seq_len, max_positions)
    train_ex, val_ex = split_examples(examples, cfg.val_fraction)
    train = pack(train_ex, seq_len, tokenizer.pad_id)
    val = pack(val_ex, seq_len, tokenizer.pad_id) if val_ex else None
    return train, val, seq_len


def sft(cfg: SFTConfig, resume: bool = False, max_steps: int | None = None, log=print) -> dict:
    """Run (or resume) SFT; returns the end-of-run summary (also written to ``OUT/summary.json``).

    With ``resume`` the run in ``cfg.out`` continues from its last complete checkpoint with its own
    saved settings; ``max_steps`` (if given) extends it. Under torchrun the model is sharded with
    FSDP2 like pre-training's; ``--batch-size`` is the global batch of packed rows and every loss
    term is its mean over the global batch's tokens, so the run means the same at any world size.
    """
    from ..checkpoint import load_pretrained
    from ..train.state import weights_dir
    from ..tokenizer import Tokenizer, TokenizerError
    from .chat_data import RowBatches

    runner = runner_from_env(cfg.device)
    run = Run.open(cfg, runner, resume=resume, steps=max_steps, state_key="sft_config", error=SFTError, log=log,
                   what="SFT run")
    cfg, ckpt, log, out_dir = run.cfg, run.ckpt, run.log, run.out_dir
    base = Path(cfg.model)
    if not (base / "config.json").is_file():
        raise SFTError(f"--model {base}: no config.json there (train a base first: `make demo` or `dsv3 train`)")
    torch.manual_seed(cfg.seed)
    device = runner.device
    try:
        tokenizer = Tokenizer.load(ckpt or base)
    except TokenizerError as e:
        raise SFTError(f"{e} (the base model directory must hold its tokenizer)") from None
    # a LoRA run's checkpoints hold the adapter only: the model always comes from the base
    # a sharded (torchrun) checkpoint has no weights in its model directory: the base, then run.restore
    model = load_pretrained(base if cfg.lora_rank else (weights_dir(ckpt) or base), dtype=torch.float32,
                            device=device)
    if cfg.lora_rank:
        runner, cfg = use_lora(run, model, cfg, base, log)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SFTError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}")
    train_rows, val_rows, seq_len = load_chat_data(cfg, tokenizer, model.config.max_position_embeddings - 1)
    if train_rows.num_truncated:
        log(f"note: {train_rows.num_truncated} conversation(s) longer than {seq_len + 1} tokens were cut")
    if cfg.max_steps is None:
        cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * len(train_rows) / cfg.batch_size)))
    batches = RowBatches(train_rows, cfg.batch_size, cfg.seed, rank=runner.rank, world_size=runner.world_size)
    optimizer = run.prepare(model)(model, cfg.lr, cfg.weight_decay)  # --fp8, sharding, then the optimizer
    schedule = Schedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.decay_start, cfg.min_lr_ratio)
    run.cfg = cfg  # with its step budget: what checkpoints save
    start = run.restore(model, optimizer, tokenizer, batches, base_model=str(base))
    model.train()
    routers = balance.routers(model)
    distill = bool(cfg.distill_weight) and bool(train_rows.teacher_valid.any())
    mtp_depth = len(model.mtp) if cfg.mtp_weight > 0 else 0

    def step(i: int) -> tuple[dict, bool]:
        t0 = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(batches).items()}
        shares, totals = runner.token_shares(token_counts(batch, mtp_depth))
        with autocast(device, cfg.dtype):
            losses = sft_losses(model, batch, cfg, shares)
        logged = {k: float(v.detach()) for k, v in losses.items() if k != "target_tokens"}
        if distill:  # the same keys on every rank: a batch without teacher records logs 0
            logged.setdefault("distill_kl", 0.0)
        rec, finite = optimizer_update(runner, model, optimizer, schedule(i), [(losses["loss"], logged)],
                                       cfg.grad_clip, routers, cfg.bias_update_rate)
        rec.update(target_tokens=int(totals[0]), epoch=batches.epoch_progress,
                   tokens_per_s=batch["tokens"].numel() / (time.perf_counter() - t0))
        return rec, finite

    final, last_eval = run.loop(cfg.max_steps, step, None if val_rows is None else
                                (lambda: evaluate_sft(model, val_rows, cfg, device)), desc="sft", postfix=_sft_postfix)

    def summarize() -> dict:
        from ..train.plots import plot_run
        plots = plot_run(out_dir / "metrics.jsonl", out_dir / "plots")
        train_recs = run.metrics.records()[0]
        return {
            "out": str(out_dir), "final": str(final), "base_model": str(base), "steps": max(start, cfg.max_steps),
            "train_rows": len(train_rows), "seq_len": seq_len,
            "train_target_tokens": train_rows.num_target_tokens,
            "val_rows": len(val_rows) if val_rows is not None else 0,
            "first_loss": train_recs[0]["lm_loss"] if train_recs else None,
            "last_loss": train_recs[-1]["lm_loss"] if train_recs else None,
            "val_loss": last_eval.get("val_loss"), "val_ppl": last_eval.get("val_ppl"),
            "val_token_acc": last_eval.get("val_token_acc"),
            "plots": [str(p) for p in plots],
            **({"lora_rank": cfg.lora_rank, "trainable_params": sum(p.numel() for g in optimizer.param_groups
                                                                    for p in g["params"])} if cfg.lora_rank else {}),
        }

    return run.finish(summarize)


def use_lora(run: Run, model, cfg: SFTConfig, base: Path, log) -> tuple:
    """Make ``run`` a LoRA run: adapters on ``model`` (everything else frozen), checkpoints that hold
    the adapter (:class:`~dsv3.train.lora_checkpoints.AdapterCheckpoints`); returns (runner, cfg).

    The aux-loss-free bias update is switched off (``bias_update_rate`` 0 in the saved config): the
    routers' bias belongs to the base, which the adapter is later applied to unchanged.
    """
    from ..lora import LoRAError, apply_lora, lora_parameters
    from ..train.lora_checkpoints import AdapterCheckpoints
    if cfg.lora_rank < 0:
        raise SFTError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    if run.runner.world_size > 1:
        raise SFTError("LoRA runs in one process for now; launch `dsv3 sft --lora-rank` without torchrun")
    if getattr(cfg, "fp8", False):
        raise SFTError("--fp8 and --lora-rank don't combine (FP8 training replaces the Linear layers LoRA wraps)")
    try:
        names = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_base_dtype,
                           cfg.lora_dropout, cfg.lora_modules_to_save)
    except LoRAError as e:
        raise SFTError(str(e)) from None
    trainable = sum(p.numel() for p in lora_parameters(model))
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    log(f"LoRA r={cfg.lora_rank} on {len(names)} modules ({cfg.lora_targets}; base {cfg.lora_base_dtype}"
        + (f"; {cfg.lora_modules_to_save} trained whole" if cfg.lora_modules_to_save else "") + "): "
        f"{trainable:,} trainable of {total:,} weights")
    if cfg.bias_update_rate:
        cfg = dataclasses.replace(cfg, bias_update_rate=0.0)
    run.runner = AdapterCheckpoints(run.runner, str(base))
    return run.runner, cfg


def _sft_postfix(rec: dict, last_eval: dict) -> dict:
    post = {"loss": f"{rec['lm_loss']:.3f}"}
    if last_eval:
        post["val"] = f"{last_eval['val_loss']:.3f}"
    return post


def format_sft_summary(s: dict) -> str:
    """The summary as a few readable lines."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    return "\n".join([
        f"sft: {s['out']}  ({s['steps']} steps, {s['wall_s']:.0f} s) from {s['base_model']}",
        f"  data          {s['train_rows']} packed rows of {s['seq_len']} tokens, "
        f"{s['train_target_tokens']:,} assistant target tokens; {s['val_rows']} val rows",
        f"  train loss    {num(s['first_loss'], '.3f')} -> {num(s['last_loss'], '.3f')} (assistant tokens)",
        f"  val loss      {num(s['val_loss'], '.3f')} (ppl {num(s['val_ppl'], '.2f')}, "
        f"next-token acc {num(s['val_token_acc'], '.3f')})",
        (f"  adapter       {s['final']}   LoRA r={s['lora_rank']}, {s['trainable_params']:,} trained weights "
         f"(dsv3 chat --model {s['base_model']} --adapter {s['final']})" if s.get("lora_rank") else
         f"  chat model    {s['final']}   (dsv3 chat --model {s['final']})"),
        f"  plots         {', '.join(s['plots']) or 'none'}",
    ])
