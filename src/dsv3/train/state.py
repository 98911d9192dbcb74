"""Training checkpoints: the HF-layout model + tokenizer + everything needed to resume exactly.

A checkpoint directory ``OUT/checkpoint-STEP/`` (and ``OUT/final/``) holds:
  config.json, model*.safetensors   the model, loadable by dsv3.load_pretrained and transformers
  tokenizer.json, tokenizer_config.json
  optimizer.safetensors             AdamW moments and step counts, the torch RNG state
  trainer_state.json                step, schedule, data position, run config, python/numpy RNG
The directory is assembled under a temporary name and renamed into place as the last step, so a
process killed at any moment leaves either the previous complete checkpoint or the new one, never
a partial one that looks complete. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_pretrained

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_CKPT_RE = re.compile(r"checkpoint-(\d+)\Z")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def save_training_checkpoint(out_dir: Path, name: str, model, tokenizer, optimizer, trainer_state: dict) -> Path:
    """Write ``out_dir/name`` atomically and return its path."""
    out_dir = Path(out_dir)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp)
    tokenizer.save(tmp)
    tensors, groups = optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    np_state = np.random.get_state()
    state = dict(trainer_state, optimizer_param_groups=groups,
                 rng={"python": _jsonable(random.getstate()),
                      "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first
        trash = out_dir / f".{name}.old-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    return final


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    return x


def _tupled(x):
    if isinstance(x, list):
        return tuple(_tupled(v) for v in x)
    return x


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer and RNG states from ``path``; returns the trainer state dict."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    tensors = load_file(str(path / OPTIMIZER_FILE))
    load_optimizer(optimizer, tensors, state["optimizer_param_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tupled(state["rng"]["python"]))
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out_dir`` as (step, path), oldest first."""
    out = []
    for p in Path(out_dir).glob("checkpoint-*"):
        m = _CKPT_RE.match(p.name)
        if m and (p / TRAINER_STATE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def clean_stale_temps(out_dir: Path) -> None:
    """Remove half-written checkpoint directories left by a killed process."""
    for p in Path(out_dir).glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob(".final.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def open_run(cfg, out_dir: Path, resume: bool, state_key: str, step_field: str, steps: int | None,
             error: type[Exception], log=print, what: str = "run"):
    """Prepare ``out_dir`` for a run of ``cfg`` (a dataclass config); returns ``(cfg, checkpoint or None)``.

    Resuming takes the config saved under ``state_key`` in the newest complete checkpoint (``final``
    included, so a finished run can be extended), keeping this call's progress/device/out and, if
    given, ``steps`` as the new ``step_field``; no checkpoint to resume is ``error``. A fresh run
    removes the previous run's checkpoints, so a later ``--resume`` cannot pick up a stale one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    ckpt = resume_point(out_dir) if resume else None
    if resume and ckpt is None:
        raise error(f"{out_dir}: no complete checkpoint to resume from")
    if ckpt is not None:
        saved = json.loads((ckpt / TRAINER_STATE).read_text())[state_key]
        here = {"progress": cfg.progress, "device": cfg.device, "out": cfg.out}
        if steps is not None:
            here[step_field] = steps
        return type(cfg)(**{**saved, **here}), ckpt
    if steps is not None:
        cfg = dataclasses.replace(cfg, **{step_field: steps})
    old = [p for _, p in list_checkpoints(out_dir)] + [p for p in [out_dir / "final"] if p.exists()]
    if old:
        log(f"{out_dir}: starting a new {what}, removing {len(old)} checkpoint(s) of the previous one "
            "(use --resume to continue it instead)")
    for p in old:
        shutil.rmtree(p)
    return cfg, None


def resume_point(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run: the last ``checkpoint-STEP`` or ``final`` (so a finished
    run can be extended with more steps), whichever has the higher step."""
    candidates = list_checkpoints(out_dir)
    final = Path(out_dir) / "final"
    if (final / TRAINER_STATE).is_file():
        candidates.append((json.loads((final / TRAINER_STATE).read_text())["step"], final))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None

