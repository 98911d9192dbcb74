"""Post-training: ``dsv3 sft``, ``dsv3 grpo`` (flags from :class:`dsv3.post.sft.SFTConfig` and
:class:`dsv3.post.grpo.GRPOConfig`) and ``dsv3 distill`` (SFT data from a teacher)."""

from __future__ import annotations

import argparse

from ..knobs import fraction, nonneg_float, positive_int
from .common import CLIError, add_command, add_device_arg, reported, require_dir, resume_dir
from .fields import add_dataclass_args, from_args


def register(subparsers) -> None:
    _add_sft(subparsers)
    _add_merge_lora(subparsers)
    _add_grpo(subparsers)
    _add_distill(subparsers)


def task_names() -> str:
    """The built-in verifiable tasks, for help texts."""
    from ..tasks import BUILTIN_TASKS
    return ", ".join(BUILTIN_TASKS)


# ---------------------------------------------------------------------- sft
def _add_sft(subparsers) -> None:
    from ..post.sft import SFTConfig
    p = add_command(subparsers, "sft", cmd_sft, help="supervised fine-tuning on chat data (base -> chat model)",
                    description="Fine-tune a model on chat JSONL ({'messages': [...]} per line, system/user/"
                                "assistant/tool roles, optional tool_calls and reasoning_content) rendered with "
                                "the model's chat template; loss on assistant tokens only; examples packed into "
                                "rows. Records written by `dsv3 distill --top-logprobs K` add a KL term toward "
                                "the teacher. Writes OUT/metrics.jsonl, atomic checkpoints, plots and OUT/final "
                                "(an HF-layout chat model for `dsv3 chat` / `dsv3 serve`).")
    # --model / --data not given stay None: required for a new run, taken from the run on --resume.
    add_dataclass_args(p, SFTConfig, defaults_override={"model": None, "data": None})
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the SFT run in DIR from its last complete checkpoint (its settings are kept; "
                        "--max-steps may extend it)")


def cmd_sft(args: argparse.Namespace) -> int:
    from ..post.chat_data import ChatDataError
    from ..post.sft import SFTConfig, SFTError, format_sft_summary, sft
    resume = resume_dir(args)
    if not resume and (args.model is None or not args.data):
        raise CLIError("--model BASE and --data FILE.jsonl are required (or --resume DIR)")
    cfg = from_args(SFTConfig, args)
    with reported(SFTError, ChatDataError):
        summary = sft(cfg, resume=resume, max_steps=args.max_steps)
    print(format_sft_summary(summary))
    return 0


# ---------------------------------------------------------------------- merge-lora
def _add_merge_lora(subparsers) -> None:
    p = add_command(subparsers, "merge-lora", cmd_merge_lora, help="fold a LoRA adapter into its base: a plain HF checkpoint",
                    description="Load BASE (an HF-layout checkpoint), apply the LoRA adapter in ADAPTER (PEFT layout: "
                                "adapter_config.json + adapter_model.safetensors, e.g. OUT/final of `dsv3 sft "
                                "--lora-rank R`), fold it into the weights (W + alpha/r * B A, summed in fp32) and "
                                "write the merged model to OUT in the base's dtype, with the tokenizer (the "
                                "adapter's if it has one, else the base's). OUT then loads anywhere the base does.")
    p.add_argument("base", metavar="BASE", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter directory")
    p.add_argument("out", metavar="OUT", help="where to write the merged checkpoint (a new or empty directory)")


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import CheckpointError, load_pretrained, save_pretrained
    from ..tokenizer import Tokenizer, TokenizerError
    from ..lora import LoRAError, merge_adapter, read_adapter_config
    require_dir(args.base, "BASE")
    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.out)
    with reported(LoRAError):
        read_adapter_config(adapter)
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"OUT {out} exists and is not empty; give a new directory")
    with reported(CheckpointError, LoRAError):
        model = merge_adapter(load_pretrained(base), adapter)
    with reported(TokenizerError):
        tokenizer = Tokenizer.load(adapter if (adapter / "tokenizer.json").is_file() else base)
    save_pretrained(model, out)
    tokenizer.save(out)
    print(f"merged {adapter} into {base}: {out}")
    return 0


# ---------------------------------------------------------------------- grpo
def _add_grpo(subparsers) -> None:
    from ..post.grpo import GRPOConfig
    p = add_command(subparsers, "grpo", cmd_grpo, help="GRPO reinforcement learning on a verifiable reward",
                    description="Group Relative Policy Optimization: per prompt sample --group-size completions "
                                "with the engine, score them with the task's reward, use group-normalized "
                                "advantages, the clipped policy ratio and a k3 KL penalty to the frozen starting "
                                "model (no value model). Built-in tasks (" + task_names() + ") generate problems "
                                "on the fly: exact-match reward 1 plus a 0.1 format reward for "
                                "REASONING</think>ANSWER. A user task is FILE.py[:function] or module[:function] "
                                "with reward(prompt, completion) -> float and prompts (a `prompts` list, a "
                                "`sample_prompt(rng)` function, or --prompts FILE).")
    # --model not given stays None (required unless --resume); --max-steps too, so a resumed run keeps its budget.
    add_dataclass_args(p, GRPOConfig, defaults_override={"model": None, "max_steps": None})
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the GRPO run in DIR (--max-steps may extend it)")


def cmd_grpo(args: argparse.Namespace) -> int:
    from ..post.grpo import GRPOConfig, GRPOError, format_grpo_summary, grpo
    resume = resume_dir(args)
    if not resume and args.model is None:
        raise CLIError("--model DIR is required (or --resume DIR)")
    with reported(GRPOError, ValueError, TypeError):
        summary = grpo(from_args(GRPOConfig, args), resume=resume, max_steps=args.max_steps)
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
    src.add_argument("--task", help=f"use problems of a built-in task ({task_names()}) as prompts")
    p.add_argument("--num", type=positive_int, default=256, help="problems to generate with --task")
    p.add_argument("--out", metavar="FILE", required=True, help="output chat JSONL")
    p.add_argument("--think", action="store_true", help="thinking mode: the teacher reasons in <think> first")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="new tokens per answer (cut answers are dropped)")
    p.add_argument("--temperature", type=nonneg_float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="keep the teacher's top-K log-probs per token for KL distillation (0: text only)")
    p.add_argument("--samples-per-prompt", type=positive_int, default=1, help="answers per prompt")
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep answers cut by --max-tokens (otherwise they are dropped)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (and of --task problems)")
    add_device_arg(p, "cpu")


def cmd_distill(args: argparse.Namespace) -> int:
    from ..post.distill import distill, read_conversations
    from ..tasks import load_task, problems
    require_dir(args.teacher, "--teacher")
    if args.top_logprobs < 0:
        raise CLIError(f"--top-logprobs must be >= 0, got {args.top_logprobs}")
    with reported(ValueError):
        if args.prompts:
            convs = read_conversations(args.prompts)
        else:
            convs = [p.messages() for p in problems(load_task(args.task), args.num, args.seed)]
        s = distill(args.teacher, convs, args.out, thinking=args.think, max_new_tokens=args.max_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_logprobs=args.top_logprobs,
                    samples_per_prompt=args.samples_per_prompt, seed=args.seed, device=args.device,
                    keep_truncated=args.keep_truncated)
    print(f"distill: {s['written']} records -> {s['out']} ({s['prompts']} prompts, {s['completion_tokens']:,} "
          f"completion tokens, {s['dropped_truncated']} cut by --max-tokens dropped"
          f"{', top-%d logprobs kept' % s['top_logprobs'] if s['top_logprobs'] else ''})")
    print(f"next: dsv3 sft --model STUDENT --data {s['out']} --out runs/distilled")
    return 0
