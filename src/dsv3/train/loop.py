"""The one training loop that pre-training (``dsv3 train``), SFT and GRPO run through.

A trainer supplies its model, batches, a *step function* (its micro-batches -> losses and metrics,
applied by :func:`optimizer_update`) and an eval; :class:`Run` does the rest the same way for all:
the run directory (interrupted saves cleaned up; a fresh run replaces the previous run's
checkpoints), resume by one rule (the newest complete checkpoint: the last ``checkpoint-STEP``, or
``final`` when newer, so a finished run can be extended; the run's saved settings win),
``metrics.jsonl`` (a JSON line per step, ``kind: eval`` lines), eval every ``eval_every`` steps and
at the end, a checkpoint every ``save_every`` steps pruned to ``keep_checkpoints``, non-finite steps
skipped (``max_nonfinite`` in a row stop the run), ``final/``, plots and ``summary.json``.

Work split over processes goes through a *runner* with one interface: :class:`ParallelTraining`
under torchrun (FSDP2 / expert parallel, rank 0 writes), :class:`SingleProcess` otherwise.

The knobs the loop itself applies are declared once, in :class:`LoopOptions`, which every trainer's
config extends: ``--fp8`` and ``--compile`` (applied to the model by :meth:`Run.prepare` and
:meth:`Run.restore`, the same way for all three) and ``--tensorboard`` (event files beside
``metrics.jsonl``: :class:`MetricsLog`); ``--dtype`` is declared there too (train/precision.py: each
trainer enters its autocast; a bf16 run in one process gets the fused AdamW from :meth:`Run.prepare`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..knobs import knob, positive_int
from . import balance
from .precision import dtype_knob, train_dtype
from .state import (clean_stale_temps, latest_checkpoint, list_checkpoints, load_training_state,
                    previous_checkpoints, read_trainer_state, remove_checkpoint, resume_point,
                    save_training_checkpoint, sharded_info)


# ------------------------------------------------------------------------------------- shared knobs
@dataclass
class LoopOptions:
    """The knobs of the one loop, shared by ``TrainConfig``, ``SFTConfig`` and ``GRPOConfig`` (their base)."""

    fp8: bool = knob(False, "FP8 mixed precision (DeepSeek-V3 recipe; train/fp8.py): E4M3 GEMMs in forward and "
                            "backward with 1x128 activation tiles and 128x128 weight blocks, fp32 master weights, "
                            "bf16 AdamW moments")
    fp8_block: int = knob(128, "FP8 tile/block size (1xB activation tiles, BxB weight blocks)", type=positive_int)
    compile: bool = knob(False, "torch.compile the attention, norms, MLPs and routers (train/compile.py): faster "
                                "steps after a one-off compile (about a minute on CPU; needs a C++ compiler; a "
                                "single process without --fp8)")
    tensorboard: bool = knob(False, "also write the metrics as TensorBoard event files to OUT/tensorboard/ (needs "
                                    "the tensorboard package: pip install 'dsv3[tensorboard]')")
    dtype: str = dtype_knob()  # the forward's precision (train/precision.py); its autocast is the trainer's to enter


def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or None when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is not installed
        return None
    return SummaryWriter


# ------------------------------------------------------------------------------------- runners
class SingleProcess:
    """The runner of a run in one process: :class:`~dsv3.train.parallel.training.ParallelTraining`'s
    interface, each call doing the plain single-device thing."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = device

    def main_first(self):
        return nullcontext()

    def barrier(self) -> None:
        pass

    def packed_batches(self, dataset, batch_size: int, seq_len: int, seed: int):
        """The training batches: every window of every step."""
        from ..data import PackedBatches
        return PackedBatches(dataset, batch_size, seq_len, split="train", seed=seed)

    def parallelize(self, model, log=print):
        return model

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def reduce_step(self, sums: dict, finite: bool, counts: dict):
        return sums, finite, counts  # one process holds the whole step

    def token_shares(self, counts: torch.Tensor):
        """One process holds the global batch: nothing to rescale, ``(None, counts)``."""
        return None, counts

    def save(self, out_dir: Path, name: str, model, tokenizer, optimizer, trainer_state: dict) -> Path:
        return save_training_checkpoint(out_dir, name, model, tokenizer, optimizer, trainer_state)

    def load(self, path: Path, model, optimizer) -> dict:
        """Weights, optimizer and RNG state of checkpoint ``path`` into ``model`` / ``optimizer``;
        returns its trainer state."""
        if sharded_info(path):  # saved by a parallel run: DCP reads the shards without a process group
            from .parallel.checkpoint import load_sharded_checkpoint
            return load_sharded_checkpoint(path, model, optimizer)
        from ..checkpoint import load_pretrained
        model.load_state_dict(load_pretrained(path, dtype=torch.float32).state_dict())
        return load_training_state(path, optimizer)

    def sampling_model(self, model, final: Path):
        return model

    def gathered_model(self, model):
        """The model with all its weights on this device: in one process, the model itself."""
        return model

    def gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order: ``[obj]``."""
        return [obj]

    def finish(self, summary: dict | None) -> dict | None:
        return summary


def runner_from_env(device: str | None = None, ep: int = 1):
    """The runner of this process: :class:`ParallelTraining` under torchrun (``WORLD_SIZE > 1``), else
    :class:`SingleProcess` on ``device`` (default: cuda if available)."""
    from ..device import resolve_device
    from .parallel.training import ParallelTraining
    dp = ParallelTraining.from_env(device, ep)
    return dp if dp is not None else SingleProcess(resolve_device(device))


# ------------------------------------------------------------------------------------- one update
def optimizer_update(runner, model, optimizer, lr: float, micro_batches: Iterable, grad_clip: float,
                     routers: list = (), bias_update_rate: float = 0.0, sums: dict | None = None) -> tuple[dict, bool]:
    """One optimizer update from micro-batches; returns (metrics, finite).

    ``micro_batches`` yields ``(loss, logged)`` per micro-batch, the forward already run: ``loss`` is
    backpropagated as it is (scaled by the caller to its share of the step), the floats in
    ``logged`` are summed into the metrics (starting from ``sums``). Then, over all ranks: the logged
    sums averaged, the expert counts summed, the gradient norm clipped. A finite step (loss and
    gradients) is applied -- AdamW, then the aux-loss-free bias update from the whole step's expert
    counts of ``routers``; a non-finite one is skipped (``skipped`` in the metrics). The gradients are
    zeroed either way, and the metrics get MaxVio_batch of the main model's MoE layers.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    sums = dict(sums or {})
    counts = {n: None for n, _ in routers}
    finite = True
    for loss, logged in micro_batches:
        finite = finite and bool(torch.isfinite(loss.detach()))
        if loss.requires_grad:  # a pipeline runner's schedule has run the backward already
            loss.backward()
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        for n, r in routers:
            if r.last_counts is not None:
                counts[n] = r.last_counts if counts[n] is None else counts[n] + r.last_counts
    sums, finite, counts = runner.reduce_step(sums, finite, counts)
    grad_norm = runner.clip_grad_norm(model, grad_clip)
    finite = finite and math.isfinite(grad_norm)
    rec = {**sums, "lr": lr, "grad_norm": grad_norm}
    if finite:
        optimizer.step()
        for n, r in routers:
            if counts[n] is not None:
                balance.update_bias(r, counts[n], bias_update_rate)
    else:
        rec["skipped"] = True
    optimizer.zero_grad(set_to_none=True)
    main_names = [n for n, _ in routers if n.startswith("layers.")]
    if main_names and all(counts[n] is not None for n in main_names):
        mv = balance.max_violation(torch.stack([counts[n] for n in main_names]))
        rec["maxvio_batch"] = [float(v) for v in mv]
        rec["maxvio_batch_mean"] = float(mv.mean())
    return rec, finite


# ------------------------------------------------------------------------------------- the run
class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, records after the resumed step are dropped; on a
    fresh run the previous file is removed. Writes nothing on ranks other than 0.

    ``tensorboard``: a directory (``OUT/tensorboard``) that gets the same records as TensorBoard
    scalars (:func:`tensorboard_scalars`), step records under ``train/``, eval records under
    ``eval/``. A fresh run empties it; a resumed one writes a new event file whose ``purge_step``
    tells TensorBoard to drop the old files' events after the resumed step (as metrics.jsonl does).
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        if tensorboard is not None:
            writer_class = tensorboard_writer_class()
            if writer_class is None:
                raise RuntimeError("--tensorboard needs the tensorboard package: pip install tensorboard")
            if resume_step is None and tensorboard.exists():
                shutil.rmtree(tensorboard)
            self.writer = writer_class(str(tensorboard), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.writer is not None:
                prefix = "eval/" if rec.get("kind") == "eval" else "train/"
                for tag, value in tensorboard_scalars(rec).items():
                    self.writer.add_scalar(prefix + tag, value, global_step=rec["step"])

    def flush(self) -> None:
        """Event files written through (``metrics.jsonl`` is written through at every record)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def records(self) -> tuple[list[dict], list[dict]]:
        """(train step records, eval records) written so far."""
        recs = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        return [r for r in recs if "kind" not in r], [r for r in recs if r.get("kind") == "eval"]


def tensorboard_scalars(rec: dict) -> dict[str, float]:
    """The TensorBoard scalars of a metrics record: every number (``loss``, ``lr``, ``grad_norm``,
    ``val_loss``, ``tokens_per_s``, ...) by its key, and each number of a flat list (per-layer
    ``maxvio_batch``) as ``key/i``. Not scalars: ``step`` (the x axis), ``kind``, flags such as
    ``skipped``, and nested lists (``expert_load``)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = {}
    for key, value in rec.items():
        if key in ("step", "kind"):
            continue
        if number(value):
            out[key] = float(value)
        elif isinstance(value, list) and value and all(number(v) for v in value):
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


class Run:
    """One run directory and the loop over its steps; see the module docstring.

    ``Run.open(...)`` prepares the directory and restores the config on resume; the trainer builds
    its model from ``run.cfg``, calls :meth:`prepare` (FP8, sharding) and builds the optimizer, then
    :meth:`restore` (and compile), :meth:`loop`, and :meth:`finish` with its summary.
    """

    def __init__(self, cfg, out_dir: Path, ckpt: Path | None, runner, state_key: str, log, error: type[Exception],
                 compile_options: dict | None = None):
        self.cfg, self.out_dir, self.ckpt, self.runner = cfg, out_dir, ckpt, runner
        self.state_key, self.log, self.error = state_key, log, error
        self.compile_options = dict(compile_options or {})
        self.start, self.is_main = 0, runner.is_main
        self.metrics: MetricsLog | None = None
        self.t_start = time.perf_counter()

    @classmethod
    def open(cls, cfg, runner, *, resume: bool, steps: int | None, state_key: str, error: type[Exception],
             keep: tuple[str, ...] = ("progress", "device", "out"), log=print, what: str = "run",
             compile_options: dict | None = None) -> Run:
        """Prepare ``cfg.out_dir`` for a run of ``cfg`` (a :class:`LoopOptions` config dataclass, saved
        in each checkpoint under ``state_key``).

        Resuming takes the config of the newest complete checkpoint (:func:`resume_point`), keeping
        this call's ``keep`` fields and ``tensorboard``, and, if given, ``steps`` as ``max_steps``; no
        checkpoint to resume is ``error``. Fields a config has renamed (its ``RENAMED_FIELDS``, old
        name -> new) are read from a saved config under their old names; fields added later whose default
        differs from how older runs behaved (its ``FORMER_DEFAULTS``, field -> value) take that value. A fresh run removes the
        previous run's checkpoints, so a later resume cannot pick up a stale one. Settings the loop
        cannot honour (``--tensorboard`` without the package, ``--compile`` with ``--fp8`` or under
        torchrun) are ``error`` here, before any work. ``compile_options`` go to ``compile_model``.
        """
        main = runner.is_main
        cls.check_options(cfg, runner, error)
        log = log if main else (lambda *a, **k: None)  # rank 0 logs, shows progress and writes files
        out_dir = cfg.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        if main:
            clean_stale_temps(out_dir)
        ckpt = resume_point(out_dir) if resume else None
        if resume and ckpt is None:
            raise error(f"{out_dir}: no complete checkpoint to resume from")
        if ckpt is not None:  # the run's own settings win; only the step budget may be extended
            saved = dict(read_trainer_state(ckpt)[state_key])
            for old, new in getattr(type(cfg), "RENAMED_FIELDS", {}).items():
                if old in saved:  # a checkpoint written before the rename
                    saved.setdefault(new, saved.pop(old))
            for field, value in getattr(type(cfg), "FORMER_DEFAULTS", {}).items():
                saved.setdefault(field, value)  # a checkpoint from before the field: it ran as the old default
            here = {k: getattr(cfg, k) for k in (*keep, "tensorboard")}
            if steps is not None:
                here["max_steps"] = steps
            cfg = type(cfg)(**{**saved, **here})
            cls.check_options(cfg, runner, error)  # the saved run's --compile / --fp8 at this world size
        else:
            if steps is not None:
                cfg = dataclasses.replace(cfg, max_steps=steps)
            old = previous_checkpoints(out_dir)
            if old:
                log(f"{out_dir}: starting a new {what}, removing {len(old)} checkpoint(s) of the previous one "
                    "(use --resume to continue it instead)")
            for p in old if main else []:
                remove_checkpoint(p)
        runner.barrier()  # the old run is gone before any rank looks at the directory
        if not main:
            cfg = dataclasses.replace(cfg, progress=False)
        return cls(cfg, out_dir, ckpt, runner, state_key, log, error, compile_options)

    @staticmethod
    def check_options(cfg, runner, error: type[Exception]) -> None:
        """``error`` for loop knobs this process cannot honour (raised before a run does any work)."""
        if cfg.tensorboard and tensorboard_writer_class() is None:
            raise error("--tensorboard needs the tensorboard package (pip install tensorboard, or "
                        "pip install 'dsv3[tensorboard]')")
        if cfg.compile and (cfg.fp8 or runner.world_size > 1):
            raise error("--compile is supported in a single process without --fp8")

    def prepare(self, model):
        """Apply ``--fp8`` to ``model`` (FP8 GEMMs, in place), then shard it over the ranks (a no-op in
        one process); returns the optimizer builder to call on the prepared model:
        :func:`~dsv3.train.optim.build_optimizer`, or under ``--fp8`` the recipe's bf16-moment AdamW
        (same arguments)."""
        from .optim import build_optimizer
        make_optimizer = build_optimizer
        if self.runner.world_size == 1 and train_dtype(self.cfg.dtype, self.runner.device) == torch.bfloat16:
            # bf16 runs have no earlier fp32 losses to match bit for bit: the fused AdamW (one kernel,
            # 6x the multi-tensor one on CPU) keeps the optimizer from eating what the bf16 GEMMs save
            make_optimizer = functools.partial(build_optimizer, fused=True)
        if self.cfg.fp8:
            from .fp8 import FP8TrainingConfig, apply_fp8_training, build_fp8_optimizer
            apply_fp8_training(model, FP8TrainingConfig(block=self.cfg.fp8_block))  # before sharding
            make_optimizer = build_fp8_optimizer
        self.runner.parallelize(model, self.log)  # from outside the model; then the optimizer over the shards
        return make_optimizer

    def restore(self, model, optimizer, tokenizer, batches=None, **saved) -> int:
        """Load the resumed checkpoint (weights, optimizer, RNG, data position) into ``model``,
        ``optimizer`` and ``batches``; returns the step to start at (0 on a fresh run). These (and
        ``saved``: more trainer-state entries) are what :meth:`loop` checkpoints. Opens the metrics log."""
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer
        self.batches, self.saved = batches, saved
        if self.ckpt is not None:
            state = self.runner.load(self.ckpt, model, optimizer)
            self.start = state["step"]
            if batches is not None:
                batches.load_state_dict(state["data"])
            self.log(f"resumed from {self.ckpt} at step {self.start}")
        if self.cfg.compile:  # from outside the model, after the weights are in; compiles during the first steps
            from .compile import compile_model
            compile_model(model, **self.compile_options)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.start if self.ckpt is not None else None,
                                  enabled=self.is_main,
                                  tensorboard=self.out_dir / "tensorboard" if self.cfg.tensorboard else None)
        return self.start

    def loop(self, max_steps: int, step: Callable[[int], tuple[dict, bool]], evaluate: Callable[[], dict] | None = None,
             eval_at_start: bool = False, desc: str = "train",
             postfix: Callable[[dict, dict], dict] | None = None) -> tuple[Path, dict]:
        """Steps ``start .. max_steps``, then the last eval and ``final``; returns (final, last eval).

        ``step(i)`` runs step ``i`` (0-based) and returns its metrics and whether it was finite;
        ``evaluate()`` -> eval metrics (None: no evals; ``eval_at_start``: also before the first step
        of a fresh run); ``postfix(rec, last_eval)`` picks what the progress bar shows.
        ``save_every``, ``eval_every``, ``keep_checkpoints`` and ``max_nonfinite`` are the config's.
        """
        metrics, log, cfg = self.metrics, self.log, self.cfg
        last_eval: dict = {}

        def save(name: str, done: int) -> Path:
            state = {"step": done, **({"data": self.batches.state_dict()} if self.batches is not None else {}),
                     self.state_key: dataclasses.asdict(cfg), **self.saved}
            return self.runner.save(self.out_dir, name, self.model, self.tokenizer, self.optimizer, state)

        def run_eval(done: int) -> dict:
            rec = {"kind": "eval", "step": done, **evaluate()}
            metrics.write(rec)
            return rec

        if evaluate is not None and eval_at_start and self.ckpt is None:
            last_eval = run_eval(self.start)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_steps, initial=self.start, desc=desc, unit="step", dynamic_ncols=True)
        self.t_start = time.perf_counter()
        nonfinite = 0
        for i in range(self.start, max_steps):
            rec, finite = step(i)
            rec = {"step": i + 1, **rec}
            if finite:
                nonfinite = 0
            else:
                nonfinite += 1
                rec["skipped"] = True
                log(f"step {i + 1}: non-finite loss/gradient, update skipped ({nonfinite} in a row)")
            metrics.write(rec)
            if nonfinite >= cfg.max_nonfinite:
                if bar is not None:
                    bar.close()
                metrics.close()
                raise self.error(f"stopping: {nonfinite} non-finite losses in a row at step {i + 1} "
                                 f"(last checkpoint: {latest_checkpoint(self.out_dir)})")
            done = i + 1
            if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != max_steps:
                last_eval = run_eval(done)
            if cfg.save_every and done % cfg.save_every == 0 and done != max_steps:
                metrics.flush()  # the event files hold what the checkpoint's metrics.jsonl does
                save(f"checkpoint-{done}", done)
                for _, old in list_checkpoints(self.out_dir)[: -max(1, cfg.keep_checkpoints)] if self.is_main else []:
                    remove_checkpoint(old)
            if bar is not None:
                bar.set_postfix((postfix or loss_postfix)(rec, last_eval), refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        final_step = max(self.start, max_steps)
        if evaluate is not None and last_eval.get("step") != final_step:
            last_eval = run_eval(final_step)
        metrics.close()
        return save("final", final_step), last_eval

    def finish(self, summarize: Callable[[], dict]) -> dict:
        """Rank 0 builds the summary (``summarize()``; plots, samples), writes ``summary.json`` with the
        run's wall time; every rank returns it."""
        summary = None
        if self.is_main:
            summary = summarize()
            summary["wall_s"] = time.perf_counter() - self.t_start
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return self.runner.finish(summary)


def loss_postfix(rec: dict, last_eval: dict) -> dict:
    """The progress bar's fields: training loss (and tokens/s, MaxVio where logged), last val loss."""
    post = {"loss": f"{rec['loss']:.3f}"}
    if "tokens_per_s" in rec:
        post["tok/s"] = f"{rec['tokens_per_s']:.0f}"
    if "maxvio_batch_mean" in rec:
        post["maxvio"] = f"{rec['maxvio_batch_mean']:.2f}"
    if last_eval.get("val_loss") is not None:
        post["val"] = f"{last_eval['val_loss']:.3f}"
    return post
