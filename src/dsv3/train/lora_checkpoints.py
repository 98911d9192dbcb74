"""Training checkpoints of a LoRA run (``dsv3 sft --lora-rank``): the adapter instead of the model.

The adapters themselves (modules, PEFT layout, merge) are :mod:`dsv3.lora`, which inference loads
too; only the checkpointing of a training run is training's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..lora import load_adapter, save_adapter


class AdapterCheckpoints:
    """A training runner (:class:`~dsv3.train.loop.SingleProcess`'s interface) whose checkpoints hold
    the adapter instead of the model: ``OUT/NAME/`` gets ``adapter_config.json`` (its
    ``base_model_name_or_path`` pointing to ``base``), ``adapter_model.safetensors`` (carrying the save
    id, so the checkpoint rules of :mod:`dsv3.train.state` hold: atomic, complete only with its state)
    and the tokenizer; ``OUT/train_state/`` as usual (the optimizer then only has adapter moments).
    Everything else is the wrapped runner's."""

    def __init__(self, runner, base: str):
        self.runner, self.base = runner, base

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def save(self, out_dir: Path, name: str, model, tokenizer, optimizer, trainer_state: dict) -> Path:
        from ..checkpoint import write_safetensors
        from .state import (OPTIMIZER_FILE, SAVE_ID_KEY, STEP_KEY, begin_save, commit_model, commit_state,
                            optimizer_tensors, write_trainer_state)
        save_id, state_tmp = begin_save(out_dir, name)
        tensors, groups = optimizer_tensors(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        write_safetensors(tensors, state_tmp / OPTIMIZER_FILE)
        write_trainer_state(state_tmp, trainer_state, save_id, groups)
        commit_state(out_dir, name, save_id, state_tmp)

        def write(tmp: Path) -> None:
            save_adapter(model, tmp, base_model=self.base,
                         metadata={SAVE_ID_KEY: save_id, STEP_KEY: str(trainer_state.get("step", ""))})
            tokenizer.save(tmp)
        return commit_model(out_dir, name, save_id, write)

    def load(self, path: Path, model, optimizer) -> dict:
        """The adapter, optimizer and RNG state of checkpoint ``path`` into ``model`` / ``optimizer``."""
        from .state import load_training_state
        load_adapter(model, path)
        return load_training_state(path, optimizer)
