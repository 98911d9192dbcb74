"""``dsv3 experiment NAME``: paper ablations and quality studies at small scale, each a comparison
of runs on the same data and seed (the code of each lives beside its feature)."""

from __future__ import annotations

import argparse

from ..knobs import positive_int
from .common import add_group, add_json_arg, add_member, reported, require_dir, write_json
from .fields import add_dataclass_args, from_args
from .train import add_train_args, train_config_from_args


def register(subparsers) -> None:
    group = add_group(subparsers, "experiment", help="reproduce a paper ablation at small scale")
    b = add_member(group, "balance", cmd_experiment_balance,
                   help="aux loss vs aux-loss-free vs no balancing: val ppl and MaxVio",
                   description="Train the same model three ways (aux-loss-free bias updates, classic aux loss, "
                               "neither), each at several seeds, and compare val perplexity, MaxVio_global and "
                               "late MaxVio_batch (mean and std over seeds): OUT/summary.json, a table, plots.")
    from ..train.experiment_balance import ARM_FIELDS, BalanceExperimentConfig
    # The arms set ARM_FIELDS themselves, from BalanceExperimentConfig's flags. No MTP by default: it
    # doesn't route the main layers that MaxVio is measured on and costs ~35% of a step.
    add_train_args(b, resume_flag=False, defaults={"save_every": 0, "sample_tokens": 0, "mtp_depth": 0},
                   exclude=ARM_FIELDS)
    add_dataclass_args(b, BalanceExperimentConfig)
    _add_post_train(group)
    _add_fp8(group)
    _add_mtp(group)
    _add_quant(group)


def cmd_experiment_balance(args: argparse.Namespace) -> int:
    from ..train.experiment_balance import BalanceExperimentConfig, format_table, run_balance_experiment
    from ..train.trainer import TrainError
    cfg = train_config_from_args(args)
    with reported(ValueError):
        exp = from_args(BalanceExperimentConfig, args)
    out = args.out or f"runs/experiment-balance-{cfg.preset}"
    with reported(TrainError):
        result = run_balance_experiment(cfg, out, exp)
    print(format_table(result))
    print(f"written: {out}/summary.json, {out}/runs.json, {out}/balance_results.md, {out}/balance.png"
          + (f", {out}/gamma_sweep.png" if exp.gamma_sweep else ""))
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


# ---------------------------------------------------------------------- fp8
def _add_fp8(group) -> None:
    e = add_member(group, "fp8", cmd_experiment_fp8,
                   help="BF16 vs FP8 mixed-precision training on the same data and seed",
                   description="Train the same model (hidden 1024: K spans 8 FP8 blocks) in the trainer's high "
                               "precision (fp32 on CPU, bf16 autocast on GPU), with FP8 GEMMs (DeepSeek-V3 recipe) "
                               "and, for the noise floor, in high precision at seed + 1; report the relative loss "
                               "error of each against the first (paper: < 0.25%) with a plot.")
    # Shorter than a default training run, so the three arms fit in minutes on 2 cores at hidden 1024:
    # 4 x 128 tokens a step, no MTP (its block is one more layer of the same GEMMs), a 2,048-token
    # vocabulary (the head stays in high precision and would dominate the time).
    add_train_args(e, resume_flag=False,
                   defaults={"max_steps": 60, "seq_len": 128, "batch_size": 4, "eval_every": 0, "save_every": 0,
                             "warmup_steps": 10, "mtp_depth": 0, "vocab_size": 2048})
    from ..train.experiment_fp8 import FP8ExperimentConfig
    add_dataclass_args(e, FP8ExperimentConfig)


def cmd_experiment_fp8(args: argparse.Namespace) -> int:
    from ..train.experiment_fp8 import FP8ExperimentConfig, format_report, run_fp8_experiment
    from ..train.trainer import TrainError
    cfg = train_config_from_args(args)
    with reported(ValueError):
        exp = from_args(FP8ExperimentConfig, args)
    out = args.out or f"runs/experiment-fp8-{cfg.preset}"
    with reported(TrainError):
        result = run_fp8_experiment(cfg, out, exp)
    print(format_report(result))
    print(f"written: {out}/fp8_results.json, {out}/fp8_results.md, {out}/fp8.png")
    return 0


# ---------------------------------------------------------------------- mtp
def _add_mtp(group) -> None:
    from ..train.experiment_mtp import MTPExperimentConfig
    m = add_member(group, "mtp", cmd_experiment_mtp,
                   help="MTP speculative decoding on a deep-narrow model: acceptance and batch-1 speed-up",
                   description="Train the deep-narrow tiny-deep preset briefly (16 layers, one MTP module), then "
                               "decode greedily at batch 1 with the compiled engine, plain and with MTP drafts "
                               "(k = 1, 2), in interleaved rounds: acceptance, mean accepted length, speed-up, the "
                               "measured draft cost c and the bound (k+1)/(1+k c). OUT/summary.json, a table.")
    # 300 steps of 8 x 128 tokens: ~5-10 minutes on 2 idle CPU cores, estimated from the tiny preset's
    # idle throughput (not measured idle). A 2,048-token BPE vocabulary keeps the re-read head, about
    # half of a draft's bytes, small.
    add_train_args(m, resume_flag=False,
                   defaults={"preset": "tiny-deep", "max_steps": 300, "seq_len": 128, "batch_size": 8,
                             "vocab_size": 2048, "eval_every": 0, "save_every": 0, "sample_tokens": 0,
                             "warmup_steps": 20})
    add_dataclass_args(m, MTPExperimentConfig)


def cmd_experiment_mtp(args: argparse.Namespace) -> int:
    from ..train.experiment_mtp import MTPExperimentConfig, format_table, run_mtp_experiment
    from ..train.trainer import TrainError
    cfg = train_config_from_args(args)
    with reported(ValueError):
        exp = from_args(MTPExperimentConfig, args)
    if exp.model is not None:
        require_dir(exp.model, "--model")
    out = args.out or f"runs/experiment-mtp-{cfg.preset}"
    with reported(TrainError, ValueError):
        result = run_mtp_experiment(cfg, out, exp)
    print(format_table(result))
    print(f"written: {out}/summary.json, {out}/mtp_results.md")
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
    from ..quant.quality import DEFAULT_PRECISIONS, format_report, quality_report
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
