"""CLI of post-training and evaluation: ``dsv3 sft``, ``dsv3 grpo``, ``dsv3 distill``, ``dsv3 eval``,
``dsv3 experiment post-train``. Cheap to import: the work is imported inside the ``cmd_*`` functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..cli import CLIError, HelpFormatter, _write_json, add_command, fraction, nonneg_float, positive_int


def add_parsers(subparsers, bench, experiment) -> None:
    """Register the commands (the hook named in ``dsv3.cli.FEATURE_CLIS``)."""
    _add_sft(subparsers)
    _add_grpo(subparsers)
    _add_distill(subparsers)
    _add_eval(subparsers)
    _add_demo(experiment)


def _task_names() -> str:
    return "arithmetic, sort, brackets, mixed"


# ---------------------------------------------------------------------- sft
def _add_sft(subparsers) -> None:
    from .sft import SFTConfig
    d = SFTConfig()
    p = add_command(subparsers, "sft", cmd_sft, help="supervised fine-tuning on chat data (base -> chat model)",
                    description="Fine-tune a model on chat JSONL ({'messages': [...]} per line, system/user/"
                                "assistant/tool roles, optional tool_calls and reasoning_content) rendered with "
                                "the model's chat template; loss on assistant tokens only; examples packed into "
                                "rows. Records written by `dsv3 distill --top-logprobs K` add a KL term toward "
                                "the teacher. Writes OUT/metrics.jsonl, atomic checkpoints, plots and OUT/final "
                                "(an HF-layout chat model for `dsv3 chat` / `dsv3 serve`).")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="the base model directory (HF layout with tokenizer), e.g. runs/tiny/final "
                        "(required unless --resume)")
    p.add_argument("--data", nargs="+", metavar="FILE", default=None, help="chat JSONL file(s) (required unless --resume)")
    p.add_argument("--out", metavar="DIR", default=d.out, help="run directory")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the SFT run in DIR from its last complete checkpoint (its settings are kept; "
                        "--max-steps may extend it)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps (default: --epochs passes over the packed rows)")
    p.add_argument("--epochs", type=nonneg_float, default=d.epochs, help="passes over the data when --max-steps is not given")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="packed rows per step")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                   help="tokens per packed row (capped at the model's context); longer conversations are cut")
    p.add_argument("--lr", type=nonneg_float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=fraction, default=d.min_lr_ratio, help="final LR as a fraction of --lr (cosine)")
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="AdamW decay on matrices")
    p.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip, help="gradient norm clip")
    p.add_argument("--val-fraction", type=fraction, default=d.val_fraction,
                   help="share of conversations held out for validation (by a hash of the record)")
    p.add_argument("--mtp-weight", type=nonneg_float, default=d.mtp_weight,
                   help="weight of the MTP loss on assistant tokens (keeps speculative decoding useful)")
    p.add_argument("--distill-weight", type=nonneg_float, default=d.distill_weight,
                   help="weight of the KL term toward teacher top-k log-probs (records with a 'teacher' field)")
    p.add_argument("--bias-update-rate", type=nonneg_float, default=d.bias_update_rate,
                   help="aux-loss-free balancing gamma (0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only final)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: only at the end)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def cmd_sft(args: argparse.Namespace) -> int:
    from .chat_data import ChatDataError
    from .sft import SFTConfig, SFTError, format_sft_summary, sft
    resume = args.resume is not None
    if resume:
        if not os.path.isdir(args.resume):
            raise CLIError(f"--resume {args.resume}: no such run directory")
        args.out = args.resume
    elif args.model is None or not args.data:
        raise CLIError("--model BASE and --data FILE.jsonl are required (or --resume DIR)")
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["progress"] = not args.no_progress
    cfg = SFTConfig(**values)
    try:
        summary = sft(cfg, resume=resume, max_steps=args.max_steps)
    except (SFTError, ChatDataError) as e:
        raise CLIError(str(e)) from None
    print(format_sft_summary(summary))
    return 0


# ---------------------------------------------------------------------- grpo
def _add_grpo(subparsers) -> None:
    from .grpo import GRPOConfig
    d = GRPOConfig()
    p = add_command(subparsers, "grpo", cmd_grpo, help="GRPO reinforcement learning on a verifiable reward",
                    description="Group Relative Policy Optimization: per prompt sample --group-size completions "
                                "with the engine, score them with the task's reward, use group-normalized "
                                "advantages, the clipped policy ratio and a k3 KL penalty to the frozen starting "
                                "model (no value model). Built-in tasks (" + _task_names() + ") generate problems "
                                "on the fly: exact-match reward 1 plus a 0.1 format reward for "
                                "REASONING</think>ANSWER. A user task is FILE.py[:function] or module[:function] "
                                "with reward(prompt, completion) -> float and prompts (a `prompts` list, a "
                                "`sample_prompt(rng)` function, or --prompts FILE).")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="the starting policy (an SFT chat model, e.g. runs/sft/final); also the KL reference "
                        "(required unless --resume)")
    p.add_argument("--task", default=d.task, help=f"built-in task ({_task_names()}) or FILE.py[:fn] / module[:fn]")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="prompts for a user task: text (one per line) or JSONL with 'prompt' / 'messages'")
    p.add_argument("--out", metavar="DIR", default=d.out, help="run directory")
    p.add_argument("--resume", metavar="DIR", default=None, help="continue the GRPO run in DIR (--steps may extend it)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"policy updates (default: {d.steps})")
    p.add_argument("--prompts-per-step", type=positive_int, default=d.prompts_per_step, help="prompts sampled per step")
    p.add_argument("--group-size", type=positive_int, default=d.group_size, help="completions per prompt (G >= 2)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens, help="completion length limit")
    p.add_argument("--temperature", type=nonneg_float, default=d.temperature, help="sampling temperature of rollouts")
    p.add_argument("--top-p", type=fraction, default=d.top_p, help="nucleus sampling mass of rollouts")
    p.add_argument("--lr", type=nonneg_float, default=d.lr, help="learning rate (constant after warmup)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup updates")
    p.add_argument("--clip-eps", type=nonneg_float, default=d.clip_eps, help="ratio clip epsilon")
    p.add_argument("--kl-beta", type=nonneg_float, default=d.kl_beta, help="KL penalty weight")
    p.add_argument("--inner-steps", type=positive_int, default=d.inner_steps, help="optimizer steps per sampled batch (mu)")
    p.add_argument("--micro-batch", type=positive_int, default=d.micro_batch, help="sequences per training forward")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of problems and sampling")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only final)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="greedy accuracy every N steps (0: start/end)")
    p.add_argument("--eval-problems", type=int, default=d.eval_problems, help="problems in the greedy eval (0: none)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def cmd_grpo(args: argparse.Namespace) -> int:
    from .grpo import GRPOConfig, GRPOError, format_grpo_summary, grpo
    resume = args.resume is not None
    if resume:
        if not os.path.isdir(args.resume):
            raise CLIError(f"--resume {args.resume}: no such run directory")
        args.out = args.resume
    elif args.model is None:
        raise CLIError("--model DIR is required (or --resume DIR)")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["progress"] = not args.no_progress
    try:
        summary = grpo(GRPOConfig(**values), resume=resume, steps=args.steps)
    except (GRPOError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    print(format_grpo_summary(summary))
    return 0


# ---------------------------------------------------------------------- distill
def _add_distill(subparsers) -> None:
    p = add_command(subparsers, "distill", cmd_distill, help="generate SFT data with a teacher model",
                    description="The teacher answers every prompt through the chat template (engine, batched) "
                                "and each answer becomes a chat JSONL record for `dsv3 sft`. --top-logprobs K "
                                "also keeps the teacher's tokens and top-K log-probs per token, for the KL "
                                "distillation loss of `dsv3 sft` (student must share the teacher's tokenizer).")
    p.add_argument("--teacher", metavar="DIR", required=True, help="teacher model directory (HF layout with tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE",
                     help="prompts: text (one user message per line) or JSONL with 'messages' or 'prompt'")
    src.add_argument("--task", help=f"use problems of a built-in task ({_task_names()}) as prompts")
    p.add_argument("--num", type=positive_int, default=256, help="problems to generate with --task")
    p.add_argument("--out", metavar="FILE", required=True, help="output chat JSONL")
    p.add_argument("--think", action="store_true", help="thinking mode: the teacher reasons in <think> first")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="new tokens per answer (cut answers are dropped)")
    p.add_argument("--temperature", type=nonneg_float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="keep the teacher's top-K log-probs per token for KL distillation (0: text only)")
    p.add_argument("--samples-per-prompt", type=positive_int, default=1, help="answers per prompt")
    p.add_argument("--keep-truncated", action="store_true", help="keep answers cut by --max-tokens (otherwise they are dropped)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (and of --task problems)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill, read_conversations
    from .tasks import load_task, problems
    if not os.path.isdir(args.teacher):
        raise CLIError(f"--teacher {args.teacher}: no such model directory")
    if args.top_logprobs < 0:
        raise CLIError(f"--top-logprobs must be >= 0, got {args.top_logprobs}")
    try:
        if args.prompts:
            convs = read_conversations(args.prompts)
        else:
            convs = [p.messages() for p in problems(load_task(args.task), args.num, args.seed)]
        s = distill(args.teacher, convs, args.out, thinking=args.think, max_new_tokens=args.max_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_logprobs=args.top_logprobs,
                    samples_per_prompt=args.samples_per_prompt, seed=args.seed, device=args.device,
                    keep_truncated=args.keep_truncated)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"distill: {s['written']} records -> {s['out']} ({s['prompts']} prompts, {s['completion_tokens']:,} "
          f"completion tokens, {s['dropped_truncated']} cut by --max-tokens dropped"
          f"{', top-%d logprobs kept' % s['top_logprobs'] if s['top_logprobs'] else ''})")
    print(f"next: dsv3 sft --model STUDENT --data {s['out']} --out runs/distilled")
    return 0


# ---------------------------------------------------------------------- eval
def _add_eval(subparsers) -> None:
    p = add_command(subparsers, "eval", cmd_eval, help="perplexity on held-out text and accuracy on verifiable tasks",
                    description="Seeded, reproducible evaluation of a model directory: perplexity on held-out "
                                "text (default: the held-out split of the stdlib corpus the pre-training demo "
                                "never trains on) and greedy accuracy on built-in verifiable tasks. "
                                "--lm-eval-task DIR writes a local lm-eval task (no download) for evaluating a "
                                "running `dsv3 serve` with EleutherAI's harness; see docs/post-training.md.")
    p.add_argument("--model", metavar="DIR", default=None, help="model directory (HF layout with tokenizer)")
    p.add_argument("--perplexity", action="store_true", help="measure perplexity (default when no --task is given)")
    p.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="held-out text: files, directories or JSONL ('text'); default: the stdlib val split")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=positive_int, default=64, help="windows scored (a seeded random subset)")
    p.add_argument("--max-text-tokens", type=positive_int, default=2_000_000,
                   help="read at most this many held-out tokens")
    p.add_argument("--task", nargs="+", default=[], help=f"task(s) to score: {_task_names()} or a user task")
    p.add_argument("--num", type=positive_int, default=100, help="problems per task")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="answer length limit")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0: greedy (deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of windows, problems and sampling")
    p.add_argument("--lm-eval-task", metavar="DIR", default=None,
                   help="write a local lm-eval task (YAML + JSONL of --num problems of the first --task, default "
                        "arithmetic) into DIR and exit")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")


def cmd_eval(args: argparse.Namespace) -> int:
    from .tasks import load_task
    if args.lm_eval_task:
        from ..eval.lm_eval import write_lm_eval_task
        task = load_task(args.task[0] if args.task else "arithmetic")
        files = write_lm_eval_task(args.lm_eval_task, task, args.num, args.seed, args.max_new_tokens)
        print("written: " + ", ".join(files))
        return 0
    if args.model is None:
        raise CLIError("--model DIR is required")
    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model}: no such model directory")
    from ..checkpoint import load_pretrained
    from ..eval.perplexity import heldout_tokens, perplexity
    from ..eval.tasks import task_accuracy
    from ..tokenizer import Tokenizer
    tokenizer = Tokenizer.load(args.model)
    model = load_pretrained(args.model, dtype="float32", device=args.device)
    result: dict = {"model": args.model, "seed": args.seed}
    if args.perplexity or not args.task:
        try:
            tokens = heldout_tokens(tokenizer, args.data, max_tokens=args.max_text_tokens)
            result["perplexity"] = perplexity(model, tokens, args.seq_len, args.max_windows, seed=args.seed)
        except ValueError as e:
            raise CLIError(str(e)) from None
        r = result["perplexity"]
        print(f"perplexity  {r['ppl']:.3f}  (loss {r['loss']:.4f} nats over {r['tokens']:,} tokens, "
              f"{r['windows']} of {r['total_windows']} windows of {r['seq_len']}, seed {r['seed']})")
    result["tasks"] = {}
    for spec in args.task:
        try:
            task = load_task(spec)
            r = task_accuracy(model, tokenizer, task, args.num, args.seed, args.max_new_tokens, args.temperature)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        result["tasks"][spec] = r
        print(f"{task.name:<12} accuracy {r['accuracy']:.3f}  format {r['format_rate']:.3f}  mean reward "
              f"{r['mean_reward']:.3f}  ({r['n']} problems, seed {r['seed']}, temperature {r['temperature']:g})")
        for s in r["samples"][:1]:
            print(f"  e.g. {s['prompt']!r} -> {s['completion']!r}")
    if args.json:
        _write_json(args.json, result)
    return 0


# ---------------------------------------------------------------------- experiment post-train
def _add_demo(experiment) -> None:
    from .demo import DemoConfig
    d = DemoConfig()
    p = experiment.add_parser("post-train", formatter_class=HelpFormatter,
                              help="the no-download post-training demo: SFT then GRPO, accuracy at each stage",
                              description="Generate a synthetic chat dataset from a verifiable task, SFT the tiny "
                                          "base of the pre-training demo on it, then GRPO; report greedy accuracy "
                                          "on held-out problems before SFT, after SFT and after GRPO. Needs "
                                          "runs/tiny/final (`make demo` or `dsv3 train`) or --base DIR.")
    p.add_argument("--base", metavar="DIR", default=d.base, help="base model (pre-trained, with tokenizer)")
    p.add_argument("--out", metavar="DIR", default=d.out, help="output directory")
    p.add_argument("--task", default=d.task, help=f"built-in task: {_task_names()}")
    p.add_argument("--sft-examples", type=positive_int, default=d.sft_examples, help="synthetic conversations")
    p.add_argument("--sft-steps", type=positive_int, default=d.sft_steps, help="SFT steps")
    p.add_argument("--sft-lr", type=nonneg_float, default=d.sft_lr, help="SFT learning rate")
    p.add_argument("--grpo-steps", type=positive_int, default=d.grpo_steps, help="GRPO steps")
    p.add_argument("--grpo-prompts", type=positive_int, default=d.grpo_prompts, help="GRPO prompts per step")
    p.add_argument("--grpo-group", type=positive_int, default=d.grpo_group, help="GRPO completions per prompt")
    p.add_argument("--grpo-lr", type=nonneg_float, default=d.grpo_lr, help="GRPO learning rate")
    p.add_argument("--eval-problems", type=positive_int, default=d.eval_problems, help="held-out problems per evaluation")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, problems and sampling")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p.set_defaults(func=cmd_post_train)


def cmd_post_train(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_demo, run_demo
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["progress"] = not args.no_progress
    try:
        result = run_demo(DemoConfig(**values))
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(format_demo(result))
    print(f"written: {args.out}/post_train_results.json, {args.out}/post_train_results.md")
    return 0
