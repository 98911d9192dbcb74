"""The training experiments, by name: ``dsv3 experiment NAME`` and anything that runs them all.

Each :class:`Experiment` names its knobs dataclass (the experiment's own flags), the function that
runs it (``run(base, out, exp, log) -> summary``) on a :class:`~dsv3.train.trainer.TrainConfig`
``base`` (the training flags, with the experiment's shorter-run ``train_defaults``), the function that
formats the summary as a table, and the files it writes. :data:`EXPERIMENTS` is the registry;
``cli/experiment.py`` builds one subcommand per entry from it, so a new experiment is one entry here
(plus its module beside the feature it measures).

The code of each experiment stays in its own module (``experiment_balance``, ``experiment_fp8``,
``experiment_mtp``); this module only names them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import experiment_balance, experiment_fp8, experiment_mtp, experiment_router
from .trainer import TrainConfig


@dataclass(frozen=True)
class Experiment:
    """One registered experiment.

    ``train_defaults`` replaces some TrainConfig defaults (shorter runs that fit in minutes on 2
    cores); ``train_exclude`` names TrainConfig fields the experiment sets itself, so they are not
    offered as training flags (a user's value would be silently replaced). ``outputs(exp)`` lists the
    files written directly under OUT for the knobs ``exp``.
    """

    name: str
    config: type                                   # the knobs dataclass, e.g. BalanceExperimentConfig
    run: Callable[..., dict]                       # run(base: TrainConfig, out, exp, log=print) -> summary
    format: Callable[[dict], str]                  # summary -> markdown table
    help: str
    description: str
    outputs: Callable[[Any], tuple[str, ...]]
    train_defaults: dict = field(default_factory=dict)
    train_exclude: tuple[str, ...] = ()

    def default_out(self, base: TrainConfig) -> str:
        """OUT when ``--out`` is not given: ``runs/experiment-NAME-PRESET``."""
        return f"runs/experiment-{self.name}-{base.preset}"

    def base_config(self, **changes) -> TrainConfig:
        """The TrainConfig the command line gives without training flags (``train_defaults``), with
        ``changes`` on top."""
        return dataclasses.replace(TrainConfig(), **{**self.train_defaults, **changes})

    def __call__(self, base: TrainConfig, out: str | Path | None = None, exp: Any = None, log=print) -> dict:
        """Run the experiment (``exp`` default: the config dataclass's defaults) under ``out``
        (default :meth:`default_out`); returns its summary."""
        return self.run(base, out if out is not None else self.default_out(base),
                        exp if exp is not None else self.config(), log=log)


BALANCE = Experiment(
    name="balance", config=experiment_balance.BalanceExperimentConfig, run=experiment_balance.run_balance_experiment,
    format=experiment_balance.format_table,
    help="aux loss vs aux-loss-free vs no balancing: val ppl and MaxVio",
    description="Train the same model three ways (aux-loss-free bias updates, classic aux loss, neither), each at "
                "several seeds, and compare val perplexity, MaxVio_global and late MaxVio_batch (mean and std over "
                "seeds): OUT/summary.json, a table, plots.",
    outputs=lambda exp: ("summary.json", "runs.json", "balance_results.md", "balance.png")
                        + (("gamma_sweep.png",) if exp.gamma_sweep else ()),
    # No MTP by default: it doesn't route the main layers that MaxVio is measured on and costs ~35% of a step.
    train_defaults={"save_every": 0, "sample_tokens": 0, "mtp_depth": 0},
    # The arms set these themselves, from BalanceExperimentConfig's flags.
    train_exclude=experiment_balance.ARM_FIELDS,
)

FP8 = Experiment(
    name="fp8", config=experiment_fp8.FP8ExperimentConfig, run=experiment_fp8.run_fp8_experiment,
    format=experiment_fp8.format_report,
    help="BF16 vs FP8 mixed-precision training on the same data and seed",
    description="Train the same model (hidden 1024: K spans 8 FP8 blocks) in the trainer's high precision (fp32 on "
                "CPU, bf16 autocast on GPU), with FP8 GEMMs (DeepSeek-V3 recipe) and, for the noise floor, in high "
                "precision at seed + 1; report the relative loss error of each against the first (paper: < 0.25%) "
                "with a plot.",
    outputs=lambda exp: ("fp8_results.json", "fp8_results.md", "fp8.png"),
    # Shorter than a default training run, so the three arms fit in minutes on 2 cores at hidden 1024:
    # 4 x 128 tokens a step, no MTP (its block is one more layer of the same GEMMs), a 2,048-token
    # vocabulary (the head stays in high precision and would dominate the time).
    train_defaults={"max_steps": 60, "seq_len": 128, "batch_size": 4, "eval_every": 0, "save_every": 0,
                    "warmup_steps": 10, "mtp_depth": 0, "vocab_size": 2048},
)

MTP = Experiment(
    name="mtp", config=experiment_mtp.MTPExperimentConfig, run=experiment_mtp.run_mtp_experiment,
    format=experiment_mtp.format_table,
    help="MTP speculative decoding on a deep-narrow model: acceptance and batch-1 speed-up",
    description="Train the deep-narrow tiny-deep preset briefly (16 layers, one MTP module), then decode greedily at "
                "batch 1 with the compiled engine, plain and with MTP drafts (k = 1, 2), in interleaved rounds: "
                "acceptance, mean accepted length, speed-up, the measured draft cost c and the bound "
                "(k+1)/(1+k c). OUT/summary.json, a table.",
    outputs=lambda exp: ("summary.json", "mtp_results.md"),
    # 300 steps of 8 x 128 tokens: ~5-10 minutes on 2 idle CPU cores, estimated from the tiny preset's
    # idle throughput (not measured idle). A 2,048-token BPE vocabulary keeps the re-read head, about
    # half of a draft's bytes, small.
    train_defaults={"preset": "tiny-deep", "max_steps": 300, "seq_len": 128, "batch_size": 8, "vocab_size": 2048,
                    "eval_every": 0, "save_every": 0, "sample_tokens": 0, "warmup_steps": 20},
)

ROUTER = Experiment(
    name="router", config=experiment_router.RouterExperimentConfig, run=experiment_router.run_router_experiment,
    format=experiment_router.format_table,
    help="router precision: the fp32 gate under bf16 autocast vs a bf16 gate",
    description="Push tokens through a model (the preset at its training init, or --model DIR) and route the hidden "
                "states reaching every MoE gate in fp32, under bf16 autocast as shipped, and with a bf16 gate: the "
                "fraction of tokens whose experts change and the largest gate-weight change. No training.",
    outputs=lambda exp: ("summary.json", "router_results.md"),
)

# name -> experiment, in `dsv3 experiment --help` order
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (BALANCE, FP8, MTP, ROUTER)}


def get(name: str) -> Experiment:
    """The experiment called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}") from None
