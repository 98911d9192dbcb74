"""Group Relative Policy Optimization: ``dsv3 grpo --model SFT --task TASK --out DIR``.

GRPO (DeepSeekMath, arXiv 2402.03300; used for DeepSeek-V3 Chat and R1) needs no value model: per
prompt ``q`` it samples a group of ``G`` completions ``o_1..o_G`` from the current policy, scores
them with a verifiable reward ``r_i``, and uses the group-normalized reward as every token's
advantage::

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          (std over the group's G rewards)

The loss maximizes, per token ``t`` of completion ``i`` with ``rho = pi(o_t) / pi_old(o_t)``::

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho * A_i, clip(rho, 1-eps, 1+eps) * A_i) - beta * KL_t ]
    KL_t = pi_ref/pi - log(pi_ref/pi) - 1          (the unbiased, always >= 0 "k3" estimator)

against a frozen reference (the starting model). ``pi_old`` is the policy that sampled the group;
with ``inner_steps = 1`` the ratio is 1 in value and GRPO is a KL-regularized policy gradient, with
more inner steps the clip bounds how far the policy moves on one batch.

**Sampling uses the inference engine** (:class:`dsv3.LLM`) on the live policy module, under
no-grad, so rollouts get the paged latent cache and continuous batching. The engine's prefix cache
holds latents computed with the weights of the time; after an update they are stale, so every step
builds a fresh engine (cheap: a block table and an empty cache) around the updated module -- no block
from an earlier step can ever be reused. Log-probabilities for the loss are recomputed with the
training forward (naive MLA), not taken from the engine.

**Under torchrun** the policy is sharded with FSDP2 like pre-training's; each step's prompts are
split over the ranks (``--prompts-per-step`` must divide by their number), every rank samples its
prompts' groups on a gathered full copy of the policy (:meth:`gathered_model`: one all-gather of the
weights per step) with the same per-completion seeds as one process, and scores and trains on
them; FSDP averages the gradients of the ranks' equal shares, so the update is the single-process
one. The frozen reference is a full copy on every rank. Rank 0 runs the greedy eval.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..knobs import fraction, knob, nonneg_float, positive_float, positive_int
from ..train.loop import LoopOptions, Run, optimizer_update, runner_from_env
from ..train.optim import Schedule
from ..train.precision import autocast
from ..tasks import BUILTIN_TASKS


class GRPOError(RuntimeError):
    """A GRPO run can't start or go on; the message says why."""


@dataclass
class GRPOConfig(LoopOptions):
    """Every knob of a GRPO run; saved in each checkpoint so ``--resume`` continues the same run. The
    loop's own knobs (``fp8``, ``fp8_block``, ``compile``, ``tensorboard``) come from :class:`LoopOptions`.

    ``steps`` is the old name of ``max_steps``: ``GRPOConfig(steps=N)`` still works (with a
    DeprecationWarning), ``--steps`` is a deprecated alias, and checkpoints saved with ``steps``
    resume (``RENAMED_FIELDS``).
    """

    model: str = knob("runs/sft/final", "the starting policy (an SFT chat model, e.g. runs/sft/final); also the KL "
                                        "reference (required unless --resume)", metavar="DIR")
    task: str = knob("arithmetic", "built-in task (" + ", ".join(BUILTIN_TASKS) + ") or FILE.py[:fn] / module[:fn]")
    prompts: str | None = knob(None, "prompts for a user task: text (one per line) or JSONL with 'prompt' / "
                                     "'messages' (default: the task's own)", metavar="FILE")
    out: str = knob("runs/grpo", "run directory", metavar="DIR")
    max_steps: int = knob(50, "policy updates (default: {default})", type=positive_int, aliases=("--steps",))
    prompts_per_step: int = knob(8, "prompts sampled per step", type=positive_int)
    group_size: int = knob(8, "completions per prompt (G >= 2)", type=positive_int)
    max_new_tokens: int = knob(48, "completion length limit", type=positive_int)
    temperature: float = knob(1.0, "sampling temperature of rollouts", type=nonneg_float)
    top_p: float = knob(1.0, "nucleus sampling mass of rollouts", type=fraction)
    lr: float = knob(5e-5, "learning rate (constant after warmup)", type=nonneg_float)
    warmup_steps: int = knob(0, "linear warmup updates")
    weight_decay: float = knob(0.0, "AdamW decay on matrices", type=nonneg_float)
    grad_clip: float = knob(1.0, "gradient norm clip", type=nonneg_float)
    clip_eps: float = knob(0.2, "ratio clip epsilon", type=nonneg_float)
    kl_beta: float = knob(0.04, "KL penalty weight (DeepSeekMath's value)", type=nonneg_float)
    adv_eps: float = knob(1e-4, "added to a group's reward std, so advantages stay finite when its rewards barely "
                                "differ", type=positive_float)
    inner_steps: int = knob(1, "optimizer steps per sampled batch (mu)", type=positive_int)
    micro_batch: int = knob(16, "sequences per training forward", type=positive_int)
    seed: int = knob(0, "seed of problems and sampling")
    save_every: int = knob(25, "checkpoint every N steps (0: only final)")
    eval_every: int = knob(25, "greedy accuracy every N steps (0: start/end)")
    eval_problems: int = knob(64, "problems in the greedy eval (0: none)")
    keep_checkpoints: int = knob(2, "how many checkpoint-STEP dirs to keep", type=positive_int)
    max_nonfinite: int = knob(5, "stop after this many non-finite losses in a row", type=positive_int)
    progress: bool = knob(True, "no live progress bar")
    device: str | None = knob(None, "torch device (default: cuda if available, else cpu)")

    steps: InitVar[int | None] = None  # the old name of max_steps (not a field: not saved, no flag)

    RENAMED_FIELDS: ClassVar[dict[str, str]] = {"steps": "max_steps"}  # old name in saved configs -> field

    def __post_init__(self, steps: int | None) -> None:
        if steps is not None:
            warnings.warn("GRPOConfig(steps=...) is deprecated: use max_steps=", DeprecationWarning, stacklevel=3)
            self.max_steps = steps

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


# --------------------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (P prompts, G completions each) -> advantages [P, G], normalized per group:
    ``(r - mean) / (std + eps)`` with the population std of the group's G rewards. A group whose
    completions all score the same gets zero advantage (nothing to learn from it)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group_size >= 2], got shape {tuple(rewards.shape)}")
    r = rewards.double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=False)
    return ((r - mean) / (std + eps)).to(rewards.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, clip_eps: float, kl_beta: float) -> tuple[torch.Tensor, dict]:
    """The GRPO loss (to minimize: ``-J``) and statistics.

    logp / old_logp / ref_logp [N, T]: per completion token log-probabilities under the policy (with
    grad), the sampling policy and the reference; advantages [N] (one per completion); mask [N, T]
    True on completion tokens. Each completion's tokens are averaged, then the completions.
    """
    mask = mask.to(logp.dtype)
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = k3_kl(logp, ref_logp)
    per_token = surrogate - kl_beta * kl
    lengths = mask.sum(1).clamp_min(1)
    objective = ((per_token * mask).sum(1) / lengths).mean()
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype)
        stats = {"kl": float((kl * mask).sum() / n), "clip_frac": float((clipped * mask).sum() / n),
                 "ratio_mean": float((ratio * mask).sum() / n)}
    return -objective, stats


def sequence_logprobs(model, tokens: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
    """tokens [N, T] -> log pi(tokens[:, t+1] | tokens[:, :t+1]) [N, T-1] with the training forward
    (the grad mode is the caller's)."""
    out = []
    step = micro_batch or tokens.shape[0]
    for i in range(0, tokens.shape[0], step):
        chunk = tokens[i:i + step]
        logits = model(chunk[:, :-1])
        out.append(logits.log_softmax(-1).gather(-1, chunk[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


# --------------------------------------------------------------------------------------- sampling
def rollout(model, tokenizer, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int,
            temperature: float, top_p: float, seed: int, first: int = 0) -> list[list[list[int]]]:
    """``group_size`` sampled completions (token ids, stop token included) per prompt, with a fresh
    engine on the live ``model`` (see the module doc on stale caches). Seeded per completion, by
    the prompt's index in the step (``first``: the index of ``prompt_ids[0]``, for a rank's slice)."""
    from ..engine import LLM, SamplingParams
    was_training = model.training
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    llm = LLM(model, tokenizer, max_num_seqs=min(len(prompt_ids) * group_size, 256),
              max_model_len=longest, seed=seed)
    prompts, params = [], []
    for i, ids in enumerate(prompt_ids):
        for j in range(group_size):
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         stop_token_ids=tokenizer.stop_ids(),
                                         seed=seed * 1_000_003 + (first + i) * group_size + j))
    try:
        outs = llm.generate(prompts, params)
    finally:
        model.train(was_training)
    flat = [o.token_ids for o in outs]
    return [flat[i * group_size:(i + 1) * group_size] for i in range(len(prompt_ids))]


def _pad_batch(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded tokens [N, T] and the completion-target mask [N, T-1]."""
    T = max(len(p) + len(c) for p, c in zip(prompt_ids, completions))
    tokens = torch.full((len(completions), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(completions), T - 1, dtype=torch.bool)
    for n, (p, c) in enumerate(zip(prompt_ids, completions)):
        tokens[n, :len(p) + len(c)] = torch.tensor(p + c)
        mask[n, len(p) - 1:len(p) + len(c) - 1] = True      # target index t predicts token t+1
    return tokens, mask


# --------------------------------------------------------------------------------------- the run
def _step_problems(task, cfg: GRPOConfig, step: int):
    rng = random.Random(f"grpo-{cfg.seed}-{step}")   # a pure function of (seed, step): exact resume
    return [task.sample(rng) for _ in range(cfg.prompts_per_step)]


def grpo(cfg: GRPOConfig, resume: bool = False, max_steps: int | None = None, log=print) -> dict:
    """Run (or resume) GRPO; returns the summary (also ``OUT/summary.json``). ``max_steps`` (if
    given) sets the budget, e.g. extends a resumed run. Under torchrun: see the module doc."""
    from ..checkpoint import load_pretrained
    from ..train.state import weights_dir
    from ..eval.tasks import task_accuracy
    from ..tokenizer import Tokenizer
    from ..train.compile import eager
    from ..tasks import completion_text, load_task, parse_completion

    runner = runner_from_env(cfg.device)
    # rollouts and logprobs see a new sequence length every step: compile for dynamic shapes
    run = Run.open(cfg, runner, resume=resume, steps=max_steps, state_key="grpo_config", error=GRPOError, log=log,
                   what="GRPO run", compile_options={"dynamic": None})
    cfg, ckpt, out_dir = run.cfg, run.ckpt, run.out_dir
    if cfg.group_size < 2:
        raise GRPOError(f"group_size must be >= 2 (advantages are relative to the group), got {cfg.group_size}")
    if cfg.prompts_per_step % runner.world_size:
        raise GRPOError(f"--prompts-per-step {cfg.prompts_per_step} is split over the ranks: it must be divisible "
                        f"by their number ({runner.world_size})")
    per_rank = cfg.prompts_per_step // runner.world_size
    first = runner.rank * per_rank  # this rank's prompts of each step: [first, first + per_rank)
    if not (Path(cfg.model) / "config.json").is_file():
        raise GRPOError(f"--model {cfg.model}: no config.json there (run `dsv3 sft` first)")
    task = load_task(cfg.task, cfg.prompts)
    torch.manual_seed(cfg.seed)
    device = runner.device
    tokenizer = Tokenizer.load(cfg.model)
    # a sharded (torchrun) checkpoint has no weights in its model directory: the base, then run.restore
    policy = load_pretrained(weights_dir(ckpt) or cfg.model, dtype=torch.float32, device=device)
    reference = load_pretrained(cfg.model, dtype=torch.float32, device=device).eval().requires_grad_(False)
    optimizer = run.prepare(policy)(policy, cfg.lr, cfg.weight_decay)  # --fp8, sharding, then the optimizer
    schedule = Schedule(cfg.lr, cfg.max_steps * cfg.inner_steps, cfg.warmup_steps, decay_start=1.0,
                        min_lr_ratio=1.0)  # constant after warmup
    start = run.restore(policy, optimizer, tokenizer, reference_model=cfg.model)
    policy.train()

    def evaluate() -> dict:
        full = runner.gathered_model(policy)  # collective; then rank 0 alone evaluates
        if not runner.is_main:
            return {}
        with eager(full):
            acc = task_accuracy(full, tokenizer, task, cfg.eval_problems, seed=cfg.seed + 10_000,
                                max_new_tokens=cfg.max_new_tokens)
        return {k: v for k, v in acc.items() if k != "samples"}

    def step(i: int) -> tuple[dict, bool]:
        t0 = time.perf_counter()
        probs = _step_problems(task, cfg, i)[first:first + per_rank]  # every rank draws all, keeps its own
        prompt_ids = [tokenizer.render_chat(p.messages(), add_generation_prompt=True, thinking=True) for p in probs]
        with eager(runner.gathered_model(policy)) as full:
            groups = rollout(full, tokenizer, prompt_ids, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                             cfg.top_p, seed=cfg.seed * 100_003 + i, first=first)
        t_sample = time.perf_counter() - t0
        texts = [[completion_text(tokenizer, c) for c in g] for g in groups]
        rewards = torch.tensor([[task.reward(p.prompt, t) for t in ts] for p, ts in zip(probs, texts)])
        correct = [[task.correct(p.prompt, t) for t in ts] for p, ts in zip(probs, texts)]
        adv = group_advantages(rewards, cfg.adv_eps).flatten()                      # [P/W*G]
        flat_prompts = [ids for ids in prompt_ids for _ in range(cfg.group_size)]
        flat_comps = [c for g in groups for c in g]
        tokens, mask = _pad_batch(flat_prompts, flat_comps, tokenizer.pad_id)
        tokens, mask, adv = tokens.to(device), mask.to(device), adv.to(device)
        with torch.no_grad(), autocast(device, cfg.dtype):
            old_logp = sequence_logprobs(policy, tokens, cfg.micro_batch).float()
            ref_logp = sequence_logprobs(reference, tokens, cfg.micro_batch).float()
        N = tokens.shape[0]

        def micro_batches():
            # One optimizer step over the whole group batch, accumulated in micro-batches; each
            # micro-batch's loss is weighted by its share of completions (the loss is a mean over them).
            for j in range(0, N, cfg.micro_batch):
                sl = slice(j, j + cfg.micro_batch)
                with autocast(device, cfg.dtype):
                    logp = sequence_logprobs(policy, tokens[sl]).float()
                loss, st = grpo_objective(logp, old_logp[sl], ref_logp[sl], adv[sl], mask[sl], cfg.clip_eps,
                                          cfg.kl_beta)
                share = tokens[sl].shape[0] / N
                yield loss * share, {"loss": float(loss.detach()) * share, **{k: v * share for k, v in st.items()}}

        finite = True
        for inner in range(cfg.inner_steps):
            stats, ok = optimizer_update(runner, policy, optimizer, schedule(i * cfg.inner_steps + inner),
                                         micro_batches(), cfg.grad_clip, sums=dict.fromkeys(GRPO_STATS, 0.0))
            finite = finite and ok
        # the step's statistics over every rank's groups, in prompt order (as one process has them)
        shared = runner.gather_object((rewards.tolist(), correct, [parse_completion(t)[0] for ts in texts for t in ts],
                                       [len(c) for c in flat_comps]))
        rewards = torch.tensor([row for part in shared for row in part[0]])         # [P, G]
        correct = [row for part in shared for row in part[1]]
        formats = [f for part in shared for f in part[2]]
        lengths = [n for part in shared for n in part[3]]
        rec = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "accuracy": sum(map(sum, correct)) / rewards.numel(),
               "format_rate": sum(formats) / rewards.numel(),
               "completion_len": sum(lengths) / len(lengths), **stats,
               "sample_s": t_sample, "step_s": time.perf_counter() - t0}
        return rec, finite

    final, _ = run.loop(cfg.max_steps, step, evaluate if cfg.eval_problems else None, eval_at_start=True, desc="grpo",
                        postfix=_grpo_postfix)

    def summarize() -> dict:
        plots = plot_grpo(out_dir / "metrics.jsonl", out_dir / "plots")
        train_recs, evals = run.metrics.records()
        return {
            "out": str(out_dir), "final": str(final), "model": cfg.model, "task": cfg.task,
            "steps": max(start, cfg.max_steps), "group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step,
            "reward_first": train_recs[0]["reward_mean"] if train_recs else None,
            "reward_last": train_recs[-1]["reward_mean"] if train_recs else None,
            "eval_accuracy_start": evals[0].get("accuracy") if evals else None,
            "eval_accuracy_end": evals[-1].get("accuracy") if evals else None,
            "plots": [str(p) for p in plots],
        }

    return run.finish(summarize)


GRPO_STATS = ("loss", "kl", "clip_frac", "ratio_mean")


def _grpo_postfix(rec: dict, last_eval: dict) -> dict:
    return {"reward": f"{rec['reward_mean']:.3f}", "acc": f"{rec['accuracy']:.2f}", "kl": f"{rec['kl']:.4f}"}


def plot_grpo(metrics_file: Path, out_dir: Path) -> list[Path]:
    """``reward.png``: mean reward and sample accuracy per step, greedy eval accuracy; ``kl.png``."""
    from ..train.plots import plt, read_metrics, save_figure  # matplotlib only when plotting
    train, evals = read_metrics(metrics_file)
    if not train:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in train], lw=1, label="mean reward (samples)")
    ax.plot(steps, [r["accuracy"] for r in train], lw=1, label="accuracy (samples)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="accuracy (greedy eval)")
    ax.set_xlabel("step"), ax.legend(), ax.grid(alpha=0.3), ax.set_title("GRPO reward")
    paths = [save_figure(fig, out_dir / "reward.png")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["kl"] for r in train], lw=1, label="KL to reference (k3)")
    ax.plot(steps, [r["clip_frac"] for r in train], lw=1, label="clipped fraction")
    ax.set_xlabel("step"), ax.legend(), ax.grid(alpha=0.3), ax.set_title("GRPO regularization")
    paths.append(save_figure(fig, out_dir / "kl.png"))
    return paths


def format_grpo_summary(s: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    return "\n".join([
        f"grpo: {s['out']}  ({s['steps']} steps of {s['prompts_per_step']} prompts x {s['group_size']} samples, "
        f"{s['wall_s']:.0f} s) task {s['task']} from {s['model']}",
        f"  mean reward   {num(s['reward_first'], '.3f')} (first step) -> {num(s['reward_last'], '.3f')} (last)",
        f"  greedy acc    {num(s['eval_accuracy_start'], '.3f')} -> {num(s['eval_accuracy_end'], '.3f')}",
        f"  model         {s['final']}",
        f"  plots         {', '.join(s['plots']) or 'none'}",
    ])
