"""The no-download post-training demo: ``dsv3 experiment post-train``.

Base -> Chat on a laptop, the way DeepSeek-V3 Chat came from V3-Base (SFT, then GRPO):

1. generate a synthetic chat dataset from a verifiable task (default: sorting short lists of digits,
   the built-in task a 10M model learns best in a few CPU minutes), each answer with a short worked
   reasoning in ``<think>`` (thinking mode of the chat template);
2. measure task accuracy of the base model (greedy, held-out problems);
3. SFT the base from the pre-training demo (``runs/tiny/final``) on it, measure again;
4. GRPO the SFT model on freshly generated problems of the same task, measure again.

Any built-in task works (``--task arithmetic``, ``brackets``, ``mixed``); docs/post-training.md
has the measured numbers.

The held-out problems come from their own seed and are removed from the SFT data, so the
accuracies are on problems the model never trained on (GRPO samples fresh problems every step,
which may include them: it never sees their answers, only rewards of its own attempts).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..knobs import knob, nonneg_float, positive_int
from ..tasks import BUILTIN_TASKS


@dataclass
class DemoConfig:
    """Knobs of the demo; the defaults take a few minutes on 2 CPU cores."""

    base: str = knob("runs/tiny/final", "base model (pre-trained, with tokenizer)", metavar="DIR")
    out: str = knob("runs/post-train", "output directory", metavar="DIR")
    task: str = knob("sort", "built-in task: " + ", ".join(BUILTIN_TASKS))
    sft_examples: int = knob(3000, "synthetic conversations", type=positive_int)
    sft_steps: int = knob(150, "SFT steps", type=positive_int)
    sft_batch_size: int = knob(16, "SFT packed rows per step", type=positive_int)
    sft_lr: float = knob(1e-3, "SFT learning rate", type=nonneg_float)
    grpo_steps: int = knob(20, "GRPO steps", type=positive_int)
    grpo_prompts: int = knob(8, "GRPO prompts per step", type=positive_int)
    grpo_group: int = knob(8, "GRPO completions per prompt", type=positive_int)
    grpo_lr: float = knob(2e-5, "GRPO learning rate", type=nonneg_float)
    kl_beta: float = knob(0.04, "GRPO KL penalty weight", type=nonneg_float)
    max_new_tokens: int = knob(24, "answer length limit of GRPO rollouts and evaluations", type=positive_int)
    eval_problems: int = knob(100, "held-out problems per evaluation", type=positive_int)
    seed: int = knob(0, "seed of data, problems and sampling")
    progress: bool = knob(True, "no live progress bars")
    device: str | None = knob(None, "torch device (default: cuda if available, else cpu)")


def _eval(model_dir: Path, task, cfg: DemoConfig) -> dict:
    from ..checkpoint import load_pretrained
    from ..eval.tasks import task_accuracy
    from ..tokenizer import Tokenizer
    model = load_pretrained(model_dir, dtype="float32", device=cfg.device)
    return task_accuracy(model, Tokenizer.load(model_dir), task, cfg.eval_problems, seed=cfg.seed + 1,
                         max_new_tokens=cfg.max_new_tokens)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the whole demo; returns (and writes to ``OUT/post_train_results.json``) the three accuracies."""
    from .grpo import GRPOConfig, grpo
    from .sft import SFTConfig, sft
    from ..tasks import load_task, problems

    base = Path(cfg.base)
    if not (base / "config.json").is_file() or not (base / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{base}: no base model there. Pre-train the tiny demo first: `make demo` "
                                "(or `dsv3 train`), which writes runs/tiny/final, or pass --base DIR")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(cfg.task)
    t_all = time.perf_counter()

    # 1. synthetic SFT data, without the held-out evaluation problems
    heldout = {p.prompt for p in problems(task, cfg.eval_problems, cfg.seed + 1)}
    train = [p for p in problems(task, cfg.sft_examples, cfg.seed + 2) if p.prompt not in heldout]
    data = out / "sft_data.jsonl"
    data.write_text("".join(json.dumps(p.sft_record()) + "\n" for p in train), encoding="utf-8")
    log(f"[1/4] {len(train)} synthetic {task.name} conversations -> {data} "
        f"({cfg.sft_examples - len(train)} dropped: held-out problems)")

    stages = {}
    t0 = time.perf_counter()
    stages["base"] = _eval(base, task, cfg)
    log(f"[2/4] base model {base}: accuracy {stages['base']['accuracy']:.3f} "
        f"(format {stages['base']['format_rate']:.3f}) in {time.perf_counter() - t0:.0f} s")

    t0 = time.perf_counter()
    sft_sum = sft(SFTConfig(model=str(base), data=[str(data)], out=str(out / "sft"), max_steps=cfg.sft_steps,
                            batch_size=cfg.sft_batch_size, seq_len=128, lr=cfg.sft_lr, seed=cfg.seed,
                            save_every=0, eval_every=max(1, cfg.sft_steps // 3), progress=cfg.progress,
                            device=cfg.device), log=log)
    stages["sft"] = _eval(Path(sft_sum["final"]), task, cfg)
    sft_s = time.perf_counter() - t0
    log(f"[3/4] SFT ({cfg.sft_steps} steps, {sft_s:.0f} s): accuracy {stages['sft']['accuracy']:.3f} "
        f"(format {stages['sft']['format_rate']:.3f})")

    t0 = time.perf_counter()
    grpo_sum = grpo(GRPOConfig(model=sft_sum["final"], task=cfg.task, out=str(out / "grpo"), max_steps=cfg.grpo_steps,
                               prompts_per_step=cfg.grpo_prompts, group_size=cfg.grpo_group,
                               max_new_tokens=cfg.max_new_tokens, lr=cfg.grpo_lr, kl_beta=cfg.kl_beta,
                               seed=cfg.seed, save_every=0, eval_every=0, eval_problems=0,
                               progress=cfg.progress, device=cfg.device), log=log)
    stages["grpo"] = _eval(Path(grpo_sum["final"]), task, cfg)
    grpo_s = time.perf_counter() - t0
    log(f"[4/4] GRPO ({cfg.grpo_steps} steps, {grpo_s:.0f} s): accuracy {stages['grpo']['accuracy']:.3f} "
        f"(format {stages['grpo']['format_rate']:.3f}); mean sample reward "
        f"{grpo_sum['reward_first']:.3f} -> {grpo_sum['reward_last']:.3f}")

    result = {"config": asdict(cfg), "task": task.name, "eval_problems": cfg.eval_problems,
              "eval_seed": cfg.seed + 1, "sft_examples": len(train),
              "accuracy": {k: v["accuracy"] for k, v in stages.items()},
              "format_rate": {k: v["format_rate"] for k, v in stages.items()},
              "mean_reward": {k: v["mean_reward"] for k, v in stages.items()},
              "samples": {k: v["samples"] for k, v in stages.items()},
              "sft": sft_sum, "grpo": grpo_sum, "sft_s": sft_s, "grpo_s": grpo_s,
              "wall_s": time.perf_counter() - t_all}
    (out / "post_train_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "post_train_results.md").write_text(format_demo(result) + "\n")
    return result


def format_demo(r: dict) -> str:
    """The before/after table."""
    rows = [("base (before SFT)", "base"), ("after SFT", "sft"), ("after GRPO", "grpo")]
    lines = [f"task {r['task']}: {r['eval_problems']} held-out problems (seed {r['eval_seed']}), greedy decoding",
             "", "| stage | accuracy | format | mean reward |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {r['accuracy'][key]:.3f} | {r['format_rate'][key]:.3f} | "
                     f"{r['mean_reward'][key]:.3f} |")
    lines += ["", f"SFT {r['sft']['steps']} steps ({r['sft_s']:.0f} s) on {r['sft_examples']} conversations; "
              f"GRPO {r['grpo']['steps']} steps ({r['grpo_s']:.0f} s); total {r['wall_s']:.0f} s"]
    s = r["samples"]["grpo"][:1]
    if s:
        lines.append(f"example after GRPO: {s[0]['prompt']!r} -> {s[0]['completion']!r}")
    return "\n".join(lines)
