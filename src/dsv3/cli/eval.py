"""``dsv3 eval``: perplexity on held-out text and accuracy on verifiable tasks (``dsv3.eval``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..eval.passkey import DEFAULT_DEPTHS
from ..knobs import int_list, nonneg_float, positive_int
from .common import CLIError, add_command, add_device_arg, reported, require_dir, write_json
from .post import task_names


def float_list(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0): passkey depths, each within [0, 1]."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more depths within [0, 1], got {text!r}")
    return values


def register(subparsers) -> None:
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
    p.add_argument("--task", nargs="+", default=[], help=f"task(s) to score: {task_names()} or a user task")
    p.add_argument("--num", type=positive_int, default=100, help="problems per task")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="answer length limit")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0: greedy (deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of windows, problems and sampling")
    p.add_argument("--passkey", action="store_true",
                   help="passkey retrieval (eval/passkey.py): a 5-digit key hidden at --depths of filler text, per "
                        "--lengths; greedy accuracy and the key's log-prob rank among --candidates numbers")
    p.add_argument("--lengths", type=int_list, default=(256, 512, 1024), metavar="N,N,...",
                   help="passkey prompt lengths in tokens (default: 256,512,1024)")
    p.add_argument("--depths", type=float_list, default=DEFAULT_DEPTHS, metavar="D,D,...",
                   help="passkey needle depths, fractions of the filler (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=positive_int, default=5, help="passkey prompts per length x depth (default: 5)")
    p.add_argument("--candidates", type=positive_int, default=10,
                   help="passkey: the key is ranked by log-prob among this many 5-digit numbers (default: 10)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="passkey heat map (default: the --json path with .png, else none)")
    p.add_argument("--lm-eval-task", metavar="DIR", default=None,
                   help="write a local lm-eval task (YAML + JSONL of --num problems of the first --task, default "
                        "arithmetic) into DIR and exit")
    add_device_arg(p, "cpu")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")


def cmd_eval(args: argparse.Namespace) -> int:
    from ..tasks import load_task
    if args.lm_eval_task:
        from ..eval.lm_eval import write_lm_eval_task
        task = load_task(args.task[0] if args.task else "arithmetic")
        files = write_lm_eval_task(args.lm_eval_task, task, args.num, args.seed, args.max_new_tokens)
        print("written: " + ", ".join(files))
        return 0
    if args.model is None:
        raise CLIError("--model DIR is required")
    require_dir(args.model, "--model")
    from ..checkpoint import load_pretrained
    from ..eval.perplexity import heldout_tokens, perplexity
    from ..eval.tasks import task_accuracy
    from ..tokenizer import Tokenizer
    tokenizer = Tokenizer.load(args.model)
    model = load_pretrained(args.model, dtype="float32", device=args.device)
    result: dict = {"model": args.model, "seed": args.seed}
    if args.passkey:
        from ..eval.passkey import format_passkey, passkey_eval, plot_passkey
        with reported(ValueError):
            r = passkey_eval(model, tokenizer, args.lengths, args.depths, args.trials, args.seed, args.candidates,
                             progress=lambda msg: print(msg, file=sys.stderr))
        print(format_passkey(r))
        plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
        if plot:
            r["plot"] = str(plot_passkey(r, plot, title=f"passkey: {args.model}"))
            print(f"plot: {r['plot']}")
        result["passkey"] = r
    if args.perplexity or not (args.task or args.passkey):
        with reported(ValueError):
            tokens = heldout_tokens(tokenizer, args.data, max_tokens=args.max_text_tokens)
            result["perplexity"] = perplexity(model, tokens, args.seq_len, args.max_windows, seed=args.seed)
        r = result["perplexity"]
        print(f"perplexity  {r['ppl']:.3f}  (loss {r['loss']:.4f} nats over {r['tokens']:,} tokens, "
              f"{r['windows']} of {r['total_windows']} windows of {r['seq_len']}, seed {r['seed']})")
    result["tasks"] = {}
    for spec in args.task:
        with reported(ValueError, TypeError):
            task = load_task(spec)
            r = task_accuracy(model, tokenizer, task, args.num, args.seed, args.max_new_tokens, args.temperature)
        result["tasks"][spec] = r
        print(f"{task.name:<12} accuracy {r['accuracy']:.3f}  format {r['format_rate']:.3f}  mean reward "
              f"{r['mean_reward']:.3f}  ({r['n']} problems, seed {r['seed']}, temperature {r['temperature']:g})")
        for s in r["samples"][:1]:
            print(f"  e.g. {s['prompt']!r} -> {s['completion']!r}")
    if args.json:
        write_json(args.json, result)
    return 0


