"""Context-extension stages (``dsv3 train --resume RUN --extend-context L``): the plan of one stage.

DeepSeek-V3 (report section 4.3) extends its 4K pre-training context in two YaRN stages of 1000
steps each: 4K -> 32K at batch 1920, then 32K -> 128K at batch 480, both at a constant LR of
7.3e-6 (the final LR of pre-training), with YaRN ``scale s = 40, alpha (beta_fast) = 32, beta
(beta_slow) = 1, mscale_all_dim = mscale = 1`` (the released config.json). Scaled to any run, a
stage here is:

- ``rope_scaling = {type: yarn, factor: L / original, original_max_position_embeddings: original,
  beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1}`` and ``max_position_embeddings = L``.
  ``original`` is the length the run was pre-trained at; a run that is already extended keeps its
  original (stage 2 after stage 1 raises the factor, as V3's 32K and 128K checkpoints share
  ``original_max_position_embeddings = 4096``), and keeps its betas and mscales. The factor never
  drops below the run's: a run whose config already has a larger one keeps it (the ``v3`` preset
  carries the released ``factor`` 40, which the paper used unchanged in both stages; scaling it per
  stage as L / original is the choice here for runs that start without YaRN).
- tokens per step kept: ``batch = batch_size * seq_len // L`` (at least one granule: the number of
  ranks), like 15360 x 4K = 1920 x 32K = 480 x 128K.
- LR: the source run's final LR (``lr * min_lr_ratio``), constant (no warmup, ``min_lr_ratio`` 1).
- steps: ``EXTEND_STEPS_FRACTION`` of the *pre-training* run's ``max_steps`` unless given. The
  paper's 1000 steps are ~0.4% of its ~240K pre-training steps (14.8T tokens at up to 15360 x 4K a
  step); that share is under one step of a demo-sized run, so the default share is larger.
- weights, AdamW moments and RNG continue from the source's newest complete checkpoint (``final``
  or the latest ``checkpoint-STEP``); the data loader restarts at the new length (its windows
  differ), on the source's tokenized data (no re-tokenizing), with the run's seed.
- a new run directory (default ``RUN-ctxL``), step count from 0; the source is never written.
  Its trainer state records the stage (:func:`plan_stage`'s ``record``), so a later stage finds
  the pre-training step budget and the original length.

This module plans; the trainer (``trainer.train``) runs the stage as an ordinary run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig
from .state import read_trainer_state, resume_point

# The stage's default steps as a share of the pre-training run's max_steps (see the module docstring).
EXTEND_STEPS_FRACTION = 0.1
# DeepSeek-V3's YaRN parameters (config.json of deepseek-ai/DeepSeek-V3), used when the run has none yet.
V3_YARN_PARAMS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@dataclass
class ContextStage:
    """One planned stage: the source checkpoint, the run config of the stage (a dict of
    ``TrainConfig`` fields), and the record saved with the stage's checkpoints."""

    source: Path
    config: dict
    record: dict


def plan_stage(run_dir: str | Path, length: int, *, out: str | None = None, steps: int | None = None,
               granule: int = 1, error: type[Exception] = ValueError) -> ContextStage:
    """The stage that continues the run in ``run_dir`` at sequence length ``length``.

    ``out``: the stage's run directory (default ``RUN-ctxL``); ``steps``: its optimizer steps
    (default ``EXTEND_STEPS_FRACTION`` of the pre-training steps, at least 1); ``granule``: the
    batch is a multiple of it (ranks). Bad requests raise ``error`` with what to do instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise error(f"--extend-context: no run directory {run_dir}")
    ckpt = resume_point(run_dir)
    if ckpt is None:
        raise error(f"--extend-context: {run_dir} has no complete checkpoint (final/ or checkpoint-STEP/ with "
                    "its train_state) to continue")
    state = read_trainer_state(ckpt)
    if "train_config" not in state:
        raise error(f"--extend-context: {ckpt} is not a pre-training checkpoint (no train_config in its state)")
    saved = dict(state["train_config"])
    current = int(saved["seq_len"])
    if length <= current:
        raise error(f"--extend-context {length}: not longer than the run's sequence length {current}")
    if length % current:
        raise error(f"--extend-context {length}: not a whole multiple of the run's sequence length {current} "
                    f"(e.g. {current * max(2, round(length / current))}); YaRN stages scale the context by a "
                    "whole factor, as 4K -> 32K -> 128K")
    source_config = ModelConfig.from_json_file(ckpt / "config.json")
    prior = state.get("context_extension")
    yarn = source_config.yarn
    if yarn is not None:   # already extended (or a preset with YaRN): keep the original length and shape
        original = int(yarn["original_max_position_embeddings"])
        params = {k: yarn[k] for k in V3_YARN_PARAMS if k in yarn}
        params = {**V3_YARN_PARAMS, **params}
        old_factor = float(yarn["factor"])
    else:
        original, params, old_factor = current, dict(V3_YARN_PARAMS), 1.0
    # never below the run's factor: a run that already carries a larger one (the v3 preset's 40, which
    # the paper keeps through both of its stages) keeps it
    factor = max(length / original, old_factor)
    rope_scaling = {"type": "yarn", "rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": original, **params}
    if granule < 1:
        raise error(f"granule must be >= 1, got {granule}")
    batch = int(saved["batch_size"]) * current // length
    batch = max(granule, batch // granule * granule)
    base_steps = int(prior["base_max_steps"]) if prior else int(saved["max_steps"])
    if steps is None:
        steps = max(1, round(EXTEND_STEPS_FRACTION * base_steps))
    if steps < 1:
        raise error(f"--extend-context: steps must be >= 1, got {steps}")
    lr = float(saved["lr"]) * float(saved["min_lr_ratio"])
    out = out or f"{str(run_dir).rstrip('/')}-ctx{length}"
    if Path(out).resolve() == run_dir.resolve():
        raise error(f"--extend-context: --out {out} is the run being extended; a stage writes a new run directory")
    overrides = dict(saved.get("model_overrides") or {})
    overrides.update(rope_scaling=rope_scaling, max_position_embeddings=length)
    config = {
        **saved, "out": out, "seq_len": length, "batch_size": batch, "max_steps": steps,
        "lr": lr, "min_lr_ratio": 1.0, "warmup_steps": 0, "model_overrides": overrides,
        # the source's tokenized data and tokenizer (a fresh stage dir would otherwise tokenize again)
        "cache_dir": saved.get("cache_dir") or str(run_dir),
        "extend_context": None,   # the stage is a plain run from here: resuming it continues the stage
        "batch_ramp": None,       # a ramp belongs to pre-training
    }
    record = {
        "stage": (int(prior["stage"]) + 1) if prior else 1,
        "source": str(ckpt), "source_step": int(state["step"]),
        "from_seq_len": current, "seq_len": length,
        "original_max_position_embeddings": original, "factor": factor,
        "batch_size": batch, "source_batch_size": int(saved["batch_size"]),
        "lr": lr, "steps": steps, "base_max_steps": base_steps,
    }
    return ContextStage(ckpt, config, record)
