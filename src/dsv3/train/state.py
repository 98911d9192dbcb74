"""Training checkpoints: a model directory a deployment engine takes as it is, plus the state to resume.

A run directory ``OUT/`` holds, per checkpoint ``NAME`` (``checkpoint-STEP`` or ``final``):
  OUT/NAME/                          the model, nothing else, so vLLM / SGLang / transformers load it as it is:
    config.json, generation_config.json, model.safetensors (or shards + index),
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
  OUT/train_state/NAME.SAVE_ID/      what resuming needs besides the weights:
    optimizer.safetensors            AdamW moments and step counts, the torch RNG state
    trainer_state.json               step, schedule, data position, run config, python/numpy RNG
SAVE_ID is a random id written into both halves (the safetensors header metadata of the model and
``trainer_state.json``); a checkpoint is complete only when ``OUT/NAME/`` exists and a state
directory carries its id. Model directories written before the state moved out (state files inside
``OUT/NAME/``) still resume.

Under torchrun the state is *sharded* (``train/parallel/checkpoint.py``, torch.distributed.checkpoint):
``OUT/train_state/NAME.SAVE_ID/`` then holds one safetensors shard file per rank (model, optimizer and
torch RNG together) instead of ``optimizer.safetensors``, and ``trainer_state.json`` lists them under
``"sharded"``. ``OUT/checkpoint-STEP/`` of such a run holds config, tokenizer and
``sharded_checkpoint.json`` (the save id; no weights); ``OUT/final/`` is always the full HF model.

Atomicity: a process killed at any moment leaves either the previous complete checkpoint or the new
one. Both halves are written under temporary names and fsynced; the state is renamed to its
id-qualified name (nothing points to it yet, so the old pair is untouched), then the model directory
is renamed into place -- the single step that switches ``NAME`` from the old pair to the new one.
When ``NAME`` exists (``final`` saved again after a resumed run is extended) the old model
directory is first moved aside to ``.NAME.old-PID``; :func:`clean_stale_temps` moves it back if the
new one never arrived, and removes state directories no model points to. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoint import CheckpointError, save_pretrained, weights_metadata, write_safetensors

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_DIR = "train_state"
# The key of the id shared by a model directory and its state, in the safetensors header metadata.
SAVE_ID_KEY = "dsv3_save_id"
STEP_KEY = "dsv3_step"
# In the model directory of a sharded checkpoint (no weights there to carry the id): the save id.
SHARDED_MARKER = "sharded_checkpoint.json"
_CKPT_RE = re.compile(r"checkpoint-(\d+)\Z")
_NAME = r"(checkpoint-\d+|final)"
_STATE_RE = re.compile(_NAME + r"\.([0-9a-f]+)\Z")
_ASIDE_RE = re.compile(r"\." + _NAME + r"\.(old|tmp|del)-[^/]*\Z")   # .NAME.old-PID, .NAME.tmp-PID, .NAME.del-PID


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as flat named tensors (``{param_index}.{key}``) plus the param-group settings."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("rng."):
            continue
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _model_save_id(model_dir: Path) -> str | None:
    """The save id in a model directory's weights (or its sharded-checkpoint marker), or None (no
    weights, unreadable, or no id)."""
    if not model_dir.is_dir():
        return None
    marker = model_dir / SHARDED_MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("save_id")
        except (json.JSONDecodeError, AttributeError):
            return None
    adapter = model_dir / "adapter_model.safetensors"  # a LoRA run's checkpoint: the adapter (dsv3/lora.py)
    if adapter.is_file() and not (model_dir / "config.json").is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(adapter), framework="pt") as f:
                return (f.metadata() or {}).get(SAVE_ID_KEY)
        except Exception:  # truncated or corrupt: not a complete checkpoint
            return None
    try:
        return weights_metadata(model_dir).get(SAVE_ID_KEY)
    except CheckpointError:
        return None


def state_dir(checkpoint: Path) -> Path | None:
    """The training-state directory that belongs to model directory ``checkpoint``, or None when
    the checkpoint is incomplete (no state carries the id in its weights)."""
    checkpoint = Path(checkpoint)
    save_id = _model_save_id(checkpoint)
    if save_id is not None:
        s = checkpoint.parent / STATE_DIR / f"{checkpoint.name}.{save_id}"
        return s if (s / TRAINER_STATE).is_file() and ((s / OPTIMIZER_FILE).is_file() or _shards_complete(s)) else None
    if (checkpoint / TRAINER_STATE).is_file() and (checkpoint / OPTIMIZER_FILE).is_file():
        return checkpoint  # written before the state moved out of the model directory
    return None


def _shards_complete(s: Path) -> bool:
    """A sharded state directory whose ``trainer_state.json`` (written last) lists shards all present."""
    try:
        sharded = json.loads((s / TRAINER_STATE).read_text()).get("sharded")
    except (OSError, json.JSONDecodeError):
        return False
    return bool(sharded) and all((s / f).is_file() for f in sharded.get("files", []))


def sharded_info(checkpoint: Path) -> dict | None:
    """``trainer_state.json``'s ``"sharded"`` entry of a complete checkpoint saved by a parallel run
    (format, world size, layout, shard files), or None for a single-process checkpoint."""
    return read_trainer_state(checkpoint).get("sharded")


def weights_dir(checkpoint: Path | None) -> Path | None:
    """``checkpoint`` when its model directory holds the model's weights (HF layout), else None: no
    checkpoint, or a sharded one, whose weights the runner's ``load`` restores (build the model from
    the base model or its ``config.json`` first)."""
    if checkpoint is None or (Path(checkpoint) / SHARDED_MARKER).is_file():
        return None
    return Path(checkpoint)


def read_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.json`` of a complete checkpoint (step, data position, run config, ...)."""
    s = state_dir(checkpoint)
    if s is None:
        raise CheckpointError(f"{checkpoint}: not a complete training checkpoint (no training state "
                              f"under {Path(checkpoint).parent / STATE_DIR} matches its weights)")
    return json.loads((s / TRAINER_STATE).read_text())


def begin_save(out_dir: Path, name: str) -> tuple[str, Path]:
    """Start saving checkpoint ``name`` of the run in ``out_dir``: a new save id and an empty temporary
    state directory to write the training state into (then :func:`write_trainer_state`,
    :func:`commit_state`, :func:`commit_model`)."""
    out_dir = Path(out_dir)
    if not re.fullmatch(_NAME, name):
        raise ValueError(f"checkpoint name {name!r}: must be 'final' or 'checkpoint-STEP'")
    states = out_dir / STATE_DIR
    states.mkdir(parents=True, exist_ok=True)
    state_tmp = states / f".{name}.tmp-{os.getpid()}"
    if state_tmp.exists():
        shutil.rmtree(state_tmp)
    state_tmp.mkdir()
    return uuid.uuid4().hex[:16], state_tmp


def write_trainer_state(state_tmp: Path, trainer_state: dict, save_id: str, groups: list[dict]) -> None:
    """``trainer_state.json``: the trainer's state, the save id, the optimizer's param groups and the
    python / numpy RNG states (the torch RNG goes with the tensors)."""
    np_state = np.random.get_state()
    state = dict(trainer_state, save_id=save_id, optimizer_param_groups=groups,
                 rng={"python": _jsonable(random.getstate()),
                      "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})
    (Path(state_tmp) / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def commit_state(out_dir: Path, name: str, save_id: str, state_tmp: Path) -> Path:
    """Fsync the written state and rename it to its id-qualified name (no model points to it yet, so
    the previous pair is untouched); returns the state directory."""
    states = Path(out_dir) / STATE_DIR
    state_final = states / f"{name}.{save_id}"
    _fsync_tree(state_tmp)
    os.rename(state_tmp, state_final)
    _fsync_dir(states)
    return state_final


def commit_model(out_dir: Path, name: str, save_id: str, write: Callable[[Path], None]) -> Path:
    """Write the model directory with ``write(tmp)`` (it must carry ``save_id``), rename it into
    place -- the single step that switches ``name`` to the new pair -- and drop the old pair."""
    out_dir = Path(out_dir)
    states = out_dir / STATE_DIR
    pid = os.getpid()
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp-{pid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    aside = None
    if final.exists():  # saving the same name again: move the old one aside first
        aside = out_dir / f".{name}.old-{pid}"
        if aside.exists():
            shutil.rmtree(aside)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(out_dir)

    # the old pair is no longer referenced
    if aside is not None:
        shutil.rmtree(aside)
    for old in states.glob(f"{name}.*"):
        if old.name != f"{name}.{save_id}":
            shutil.rmtree(old)
    return final


def save_training_checkpoint(out_dir: Path, name: str, model, tokenizer, optimizer, trainer_state: dict,
                             save_model=None) -> Path:
    """Write checkpoint ``name`` of the run in ``out_dir`` atomically; returns the model directory
    ``out_dir/name`` (its training state goes to ``out_dir/train_state/``). ``save_model(model, dir,
    metadata)`` writes the weights (default :func:`~dsv3.checkpoint.save_pretrained`; a LoRA run
    writes only its adapter)."""
    save_model = save_model or (lambda m, d, metadata: save_pretrained(m, d, metadata=metadata))
    save_id, state_tmp = begin_save(out_dir, name)

    # 1. the training state, under its id-qualified name: no model points to it yet
    tensors, groups = optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    write_safetensors(tensors, state_tmp / OPTIMIZER_FILE)
    write_trainer_state(state_tmp, trainer_state, save_id, groups)
    commit_state(out_dir, name, save_id, state_tmp)

    # 2. the model directory, carrying the same id; renaming it into place is the commit
    def write(tmp: Path) -> None:
        save_model(model, tmp, {SAVE_ID_KEY: save_id, STEP_KEY: str(trainer_state.get("step", ""))})
        tokenizer.save(tmp)
    return commit_model(out_dir, name, save_id, write)


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def _tupled(x):
    if isinstance(x, list):
        return tuple(_tupled(v) for v in x)
    return x


def restore_rng(state: dict, torch_rng: torch.Tensor) -> None:
    """Set the torch RNG to ``torch_rng`` and the python / numpy RNGs to those in trainer state ``state``."""
    torch.set_rng_state(torch_rng)
    random.setstate(_tupled(state["rng"]["python"]))
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG states of single-process checkpoint ``path`` (its model directory);
    returns the trainer state dict. (A sharded checkpoint's state: ``train/parallel/checkpoint.py``.)"""
    s = state_dir(Path(path))
    if s is None:
        raise CheckpointError(f"{path}: not a complete training checkpoint, no training state to resume")
    state = json.loads((s / TRAINER_STATE).read_text())
    if state.get("sharded"):
        raise CheckpointError(f"{path}: a sharded checkpoint (saved by a parallel run); its optimizer state is "
                              "read by dsv3.train.parallel.checkpoint.load_sharded_checkpoint")
    tensors = load_file(str(s / OPTIMIZER_FILE))
    load_optimizer(optimizer, tensors, state["optimizer_param_groups"])
    restore_rng(state, tensors["rng.torch"])
    return state


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-STEP`` checkpoints in ``out_dir`` as (step, model directory), oldest first."""
    out = []
    for p in Path(out_dir).glob("checkpoint-*"):
        m = _CKPT_RE.match(p.name)
        if m and state_dir(p) is not None:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint: its model directory and its training state.

    The model directory is renamed away first, so a kill half-way through leaves no directory named
    like a checkpoint that lacks files; :func:`clean_stale_temps` finishes the job."""
    checkpoint = Path(checkpoint)
    states = checkpoint.parent / STATE_DIR
    if checkpoint.exists():
        doomed = checkpoint.with_name(f".{checkpoint.name}.del-{os.getpid()}")
        if doomed.exists():
            shutil.rmtree(doomed)
        os.rename(checkpoint, doomed)
        shutil.rmtree(doomed)
    for s in states.glob(f"{checkpoint.name}.*"):
        if _STATE_RE.match(s.name):
            shutil.rmtree(s, ignore_errors=True)


def clean_stale_temps(out_dir: Path) -> None:
    """Finish what a killed process left: drop half-written directories, put back a model directory
    that was moved aside for a save that never completed, and remove training states no model
    directory points to. Afterwards every checkpoint is a complete pair or gone."""
    out_dir = Path(out_dir)
    states = out_dir / STATE_DIR
    aside: dict[str, list[Path]] = {}
    for root in (out_dir, states):
        for p in sorted(root.glob(".*")) if root.is_dir() else []:
            m = _ASIDE_RE.match(p.name)
            if m is None:
                continue
            if m.group(2) == "old" and root == out_dir:
                aside.setdefault(m.group(1), []).append(p)
            else:  # half-written, or being deleted
                shutil.rmtree(p, ignore_errors=True)
    for name, olds in aside.items():
        final = out_dir / name
        if not final.exists():  # killed between moving the old one aside and renaming the new one in
            paired = [p for p in olds if _model_save_id(p) is not None
                      and (states / f"{name}.{_model_save_id(p)}").is_dir()]
            restore = (paired or olds)[-1]
            os.rename(restore, final)
            olds = [p for p in olds if p != restore]
        for p in olds:
            shutil.rmtree(p, ignore_errors=True)
    for s in sorted(states.iterdir()) if states.is_dir() else []:
        m = _STATE_RE.match(s.name)
        if m and _model_save_id(out_dir / m.group(1)) != m.group(2):
            shutil.rmtree(s, ignore_errors=True)


def previous_checkpoints(out_dir: Path) -> list[Path]:
    """Every checkpoint of the run in ``out_dir`` (complete ``checkpoint-STEP`` ones and ``final``),
    the ones a fresh run replaces."""
    final = Path(out_dir) / "final"
    return [p for _, p in list_checkpoints(out_dir)] + ([final] if final.exists() else [])


def resume_point(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: the last ``checkpoint-STEP`` or ``final`` (so a finished
    run can be extended with more steps), whichever has the higher step."""
    candidates = list_checkpoints(out_dir)
    final = Path(out_dir) / "final"
    if state_dir(final) is not None:
        candidates.append((read_trainer_state(final)["step"], final))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None
