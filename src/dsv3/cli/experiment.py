"""``dsv3 experiment NAME``: paper ablations and quality studies at small scale, each a comparison
of runs on the same data and seed (the code of each lives beside its feature).

The training experiments (balance, fp8, mtp) come from the registry ``dsv3.train.experiments``: one
subcommand per entry, built the same way. ``post-train`` (post/demo.py) and ``quant``
(eval/quant_quality.py) are not training runs of a TrainConfig and keep their own flags here."""

from __future__ import annotations

import argparse
import dataclasses

from ..knobs import positive_int
from .common import add_group, add_json_arg, add_member, reported, require_dir, write_json
from .fields import add_dataclass_args, from_args
from .train import add_train_args, train_config_from_args


def register(subparsers) -> None:
    from ..train.experiments import EXPERIMENTS
    group = add_group(subparsers, "experiment", help="reproduce a paper ablation at small scale")
    for e in EXPERIMENTS.values():
        _add_training_experiment(group, e)
    _add_all(group)
    _add_post_train(group)
    _add_quant(group)


# ---------------------------------------------------------------------- the training experiments
def _add_training_experiment(group, e) -> None:
    """``dsv3 experiment NAME`` for registered experiment ``e`` (dsv3.train.experiments): the training
    flags with its shorter-run defaults, minus the fields it sets itself, then its own knobs."""
    p = add_member(group, e.name, _command(e.name), help=e.help, description=e.description)
    add_train_args(p, resume_flag=False, defaults=e.train_defaults, exclude=e.train_exclude)
    add_dataclass_args(p, e.config)


def _command(name: str):
    def cmd(args: argparse.Namespace) -> int:
        return run_training_experiment(name, args)
    cmd.__name__ = cmd.__qualname__ = f"cmd_experiment_{name.replace('-', '_')}"
    return cmd


def run_training_experiment(name: str, args: argparse.Namespace) -> int:
    """Run registered experiment ``name`` from its parsed flags; print its table and what it wrote."""
    from ..train.experiments import get
    from ..train.trainer import TrainError
    e = get(name)
    cfg = train_config_from_args(args)
    with reported(ValueError):
        exp = from_args(e.config, args)
    # A knob naming a directory (e.g. mtp's --model) must exist before minutes of work start.
    for f in dataclasses.fields(exp):
        value = getattr(exp, f.name)
        if f.metadata.get("metavar") == "DIR" and value is not None:
            require_dir(value, "--" + f.name.replace("_", "-"))
    out = args.out or e.default_out(cfg)
    # ValueError: a checkpoint or data that doesn't fit the experiment (e.g. mtp --model without MTP)
    with reported(TrainError, ValueError):
        result = e.run(cfg, out, exp)
    print(e.format(result))
    print("written: " + ", ".join(f"{out}/{file}" for file in e.outputs(exp)))
    return 0


# ---------------------------------------------------------------------- all
# The training flags `experiment all` passes to every experiment (the rest are each experiment's own).
ALL_TRAIN_FIELDS = ("data", "device", "progress")


def _add_all(group) -> None:
    import dataclasses as dc

    from ..train.experiment_all import AllExperimentsConfig
    from ..train.trainer import TrainConfig
    p = add_member(group, "all", cmd_experiment_all, help="every reproduction above, one report",
                   description="Run router, fp8, balance and mtp at their defaults under OUT/NAME (an experiment "
                               "whose summary is already there is reused unless --force), then write OUT/report.md "
                               "(the paper's claims beside ours, every table and plot) and OUT/summary.json.")
    p.add_argument("--out", metavar="DIR", default="runs/experiment-all", help="output directory (default: %(default)s)")
    add_dataclass_args(p, TrainConfig, exclude={f.name for f in dc.fields(TrainConfig)} - set(ALL_TRAIN_FIELDS))
    add_dataclass_args(p, AllExperimentsConfig)


def cmd_experiment_all(args: argparse.Namespace) -> int:
    from ..train.experiment_all import AllExperimentsConfig, run_all
    from ..train.trainer import TrainConfig, TrainError
    with reported(ValueError):
        cfg = from_args(AllExperimentsConfig, args)
        base = from_args(TrainConfig, args)
    train = {name: getattr(base, name) for name in ALL_TRAIN_FIELDS}
    with reported(TrainError, ValueError):
        result = run_all(args.out, cfg, train)
    for row in result["claims"]:
        print(f"{row['experiment']}: {row['ours']}")
    print(f"written: {args.out}/report.md, {args.out}/summary.json")
    return 0


# ---------------------------------------------------------------------- post-train
def _add_post_train(group) -> None:
    from ..post.demo import DemoConfig
    p = add_member(group, "post-train", cmd_post_train,
                   help="the no-download post-training demo: SFT then GRPO, accuracy at each stage",
                   description="Generate a synthetic chat dataset from a verifiable task, SFT the tiny base of "
                               "the pre-training demo on it, then GRPO; report greedy accuracy on held-out "
                               "problems before SFT, after SFT and after GRPO. Needs runs/tiny/final (`make demo` "
                               "or `dsv3 train`) or --base DIR.")
    add_dataclass_args(p, DemoConfig)


def cmd_post_train(args: argparse.Namespace) -> int:
    from ..post.demo import DemoConfig, format_demo, run_demo
    with reported(ValueError):
        result = run_demo(from_args(DemoConfig, args))
    print(format_demo(result))
    print(f"written: {args.out}/post_train_results.json, {args.out}/post_train_results.md")
    return 0


# ---------------------------------------------------------------------- quant
def _add_quant(group) -> None:
    q = add_member(group, "quant", cmd_experiment_quant,
                   help="quality of fp32 / bf16 / weight-only int8 / int4 decoding on one checkpoint",
                   description="Load the checkpoint at each precision and measure, against fp32: perplexity on "
                               "held-out text (as dsv3 eval), teacher-forced top-1 agreement and KL divergence, "
                               "and greedy agreement of the engine (identical sequences, common prefix). See "
                               "docs/engine-performance.md.")
    q.add_argument("--model", metavar="DIR", required=True, help="checkpoint directory with its tokenizer")
    q.add_argument("--precisions", nargs="+", default=None, metavar="NAME",
                   help="fp32, bf16, int8, int8+head, int4, int4+head (default: all; fp32 is always measured)")
    q.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="held-out text: files, directories or JSONL ('text'); default: the stdlib val split")
    q.add_argument("--seq-len", type=positive_int, default=256, help="tokens per perplexity window")
    q.add_argument("--max-windows", type=positive_int, default=32, help="windows scored (a seeded random subset)")
    q.add_argument("--prompts", type=positive_int, default=16, help="greedy generations (prompts from the windows)")
    q.add_argument("--prompt-len", type=positive_int, default=32, help="tokens per greedy prompt")
    q.add_argument("--gen-len", type=positive_int, default=32, help="greedy tokens per prompt")
    q.add_argument("--group-size", type=positive_int, default=32, help="int4 input channels per scale")
    q.add_argument("--seed", type=int, default=0, help="seed of the windows")
    q.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    add_json_arg(q, "the results")


def cmd_experiment_quant(args: argparse.Namespace) -> int:
    from ..eval.quant_quality import DEFAULT_PRECISIONS, format_report, quality_report
    require_dir(args.model, "--model")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    with reported(ValueError):
        report = quality_report(args.model, tuple(args.precisions or DEFAULT_PRECISIONS), args.data, args.seq_len,
                                args.max_windows, args.prompts, args.prompt_len, args.gen_len, args.group_size,
                                args.seed, log=lambda line: None)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0
